"""The embedding cache keys on the input form too: a joint (prompt + text) embedding of a text sample
differs from the embedding of the text alone. Existing rows were all embedded from the sample alone."""

from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("rewards", "0005_encoder_modalities"),
    ]

    operations = [
        migrations.RemoveConstraint(
            model_name="sampleembedding",
            name="sample_embedding_once",
        ),
        migrations.AddField(
            model_name="sampleembedding",
            name="input",
            field=models.CharField(
                choices=[
                    ("response", "the sample alone"),
                    ("joint", "prompt and text sample together (text pair)"),
                ],
                default="response",
                max_length=10,
            ),
        ),
        migrations.AddConstraint(
            model_name="sampleembedding",
            constraint=models.UniqueConstraint(
                fields=("encoder", "sample", "input"), name="sample_embedding_once"
            ),
        ),
        migrations.AddConstraint(
            model_name="sampleembedding",
            constraint=models.CheckConstraint(
                condition=models.Q(("input__in", ["response", "joint"])), name="sample_embedding_input_known"
            ),
        ),
    ]
