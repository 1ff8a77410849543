from django.db import migrations, models

# What each family embedded before an encoder could say more in its config.json.
FAMILY_MODALITIES = {"clip": ["image", "video"], "siglip": ["image", "video"], "text": ["text"]}


def fill(apps, schema_editor):  # type: ignore[no-untyped-def]
    Encoder = apps.get_model("rewards", "Encoder")
    for family, modalities in FAMILY_MODALITIES.items():
        Encoder.objects.filter(family=family).update(modalities=modalities)


class Migration(migrations.Migration):
    dependencies = [
        ("rewards", "0004_version_scored_at"),
    ]

    operations = [
        migrations.AddField(
            model_name="encoder",
            name="modalities",
            field=models.JSONField(
                default=list,
                help_text="What its samples may be: image/video for CLIP/SigLIP, text for sentence "
                "encoders, or what its config.json's sample_modalities says.",
            ),
        ),
        migrations.RunPython(fill, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="rewardconfig",
            name="encoder_path",
            field=models.CharField(
                blank=True,
                default="",
                help_text="Local encoder directory (CLIP/SigLIP for images and videos, a sentence encoder "
                "for text). Blank: the bundled MiniLM for a text project, else the built-in image-text "
                "encoder (or RL_DEFAULT_MEDIA_ENCODER).",
                max_length=1000,
            ),
        ),
    ]
