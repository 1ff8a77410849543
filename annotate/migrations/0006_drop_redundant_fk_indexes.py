"""Drop single-column foreign-key indexes that a composite index already serves (its leading
column): every label writes each index of the judgment and assignment rows. Only the indexes go;
the foreign-key constraints stay as they are (AlterField alone would drop and re-validate them)."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models

DROPPED = [
    ("annotate_assignment_comparison_id_e60d423e", "annotate_assignment", "comparison_id"),
    ("annotate_assignment_project_id_8d508500", "annotate_assignment", "project_id"),
    ("annotate_judgment_annotator_id_b695945d", "annotate_judgment", "annotator_id"),
    ("annotate_judgment_comparison_id_31a2627d", "annotate_judgment", "comparison_id"),
    ("annotate_judgment_project_id_66c86584", "annotate_judgment", "project_id"),
]


class Migration(migrations.Migration):
    dependencies = [
        ("annotate", "0005_labeling_functions"),
        migrations.swappable_dependency(settings.AUTH_USER_MODEL),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="assignment",
                    name="comparison",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="assignments",
                        to="annotate.comparison",
                    ),
                ),
                migrations.AlterField(
                    model_name="assignment",
                    name="project",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="+",
                        to="annotate.project",
                    ),
                ),
                migrations.AlterField(
                    model_name="judgment",
                    name="annotator",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="judgments",
                        to=settings.AUTH_USER_MODEL,
                    ),
                ),
                migrations.AlterField(
                    model_name="judgment",
                    name="comparison",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="judgments",
                        to="annotate.comparison",
                    ),
                ),
                migrations.AlterField(
                    model_name="judgment",
                    name="project",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="judgments",
                        to="annotate.project",
                    ),
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    sql=f"DROP INDEX IF EXISTS {name}",
                    reverse_sql=f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({column})",
                )
                for name, table, column in DROPPED
            ],
        ),
    ]
