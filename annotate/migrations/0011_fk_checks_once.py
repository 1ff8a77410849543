"""Each foreign key checked once. The composite keys of migration 0002 (a sample's, comparison's
and comparison entry's (prompt, project) / (sample, prompt) / (comparison, prompt) must exist
together) already imply the single-column keys below, and every row written checked both: a
bulk import spent a third of its database time on the duplicates. The single-column constraints
go (the composites keep the same guarantees), and so do indexes a composite index leads with.

Django's on_delete rules run in Python and are unchanged."""

import django.db.models.deletion
from django.db import migrations, models

DROPPED_CONSTRAINTS = [
    # (table, constraint, column, referenced table)
    ("annotate_sample", "annotate_sample_project_id_f7057153_fk_annotate_project_id", "project_id", "annotate_project"),
    ("annotate_sample", "annotate_sample_prompt_id_cb131259_fk_annotate_prompt_id", "prompt_id", "annotate_prompt"),
    ("annotate_comparison", "annotate_comparison_project_id_4a44adea_fk_annotate_project_id", "project_id", "annotate_project"),
    ("annotate_comparison", "annotate_comparison_prompt_id_0aa28ac2_fk_annotate_prompt_id", "prompt_id", "annotate_prompt"),
    ("annotate_comparisonsample", "annotate_comparisons_comparison_id_fae23cd3_fk_annotate_", "comparison_id", "annotate_comparison"),
    ("annotate_comparisonsample", "annotate_comparisons_sample_id_71b80958_fk_annotate_", "sample_id", "annotate_sample"),
    ("annotate_comparisonsample", "annotate_comparisons_prompt_id_ea7d1bc3_fk_annotate_", "prompt_id", "annotate_prompt"),
]  # fmt: skip
DROPPED_INDEXES = [
    # (index, table, column): covered by sample_unique_content, the (prompt, generator_version)
    # index, compsample_unique_position and prompt_unique_text
    ("annotate_sample_project_id_f7057153", "annotate_sample", "project_id"),
    ("annotate_sample_prompt_id_cb131259", "annotate_sample", "prompt_id"),
    ("annotate_comparisonsample_comparison_id_fae23cd3", "annotate_comparisonsample", "comparison_id"),
    ("annotate_prompt_project_id_2b8d49c8", "annotate_prompt", "project_id"),
]


class Migration(migrations.Migration):
    dependencies = [("annotate", "0010_sample_identity_prompt_content")]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.AlterField(
                    model_name="comparison",
                    name="project",
                    field=models.ForeignKey(
                        db_constraint=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="comparisons",
                        to="annotate.project",
                    ),
                ),
                migrations.AlterField(
                    model_name="comparison",
                    name="prompt",
                    field=models.ForeignKey(
                        db_constraint=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="comparisons",
                        to="annotate.prompt",
                    ),
                ),
                migrations.AlterField(
                    model_name="comparisonsample",
                    name="comparison",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="entries",
                        to="annotate.comparison",
                    ),
                ),
                migrations.AlterField(
                    model_name="comparisonsample",
                    name="prompt",
                    field=models.ForeignKey(
                        db_constraint=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="+",
                        to="annotate.prompt",
                    ),
                ),
                migrations.AlterField(
                    model_name="comparisonsample",
                    name="sample",
                    field=models.ForeignKey(
                        db_constraint=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="entries",
                        to="annotate.sample",
                    ),
                ),
                migrations.AlterField(
                    model_name="prompt",
                    name="project",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="prompts",
                        to="annotate.project",
                    ),
                ),
                migrations.AlterField(
                    model_name="sample",
                    name="project",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="samples",
                        to="annotate.project",
                    ),
                ),
                migrations.AlterField(
                    model_name="sample",
                    name="prompt",
                    field=models.ForeignKey(
                        db_constraint=False,
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="samples",
                        to="annotate.prompt",
                    ),
                ),
            ],
            database_operations=[
                migrations.RunSQL(
                    sql=f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}",
                    reverse_sql=f"ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY ({column}) "
                    f"REFERENCES {ref} (id) DEFERRABLE INITIALLY DEFERRED",
                )
                for table, name, column, ref in DROPPED_CONSTRAINTS
            ]
            + [
                migrations.RunSQL(
                    sql=f"DROP INDEX IF EXISTS {name}",
                    reverse_sql=f"CREATE INDEX IF NOT EXISTS {name} ON {table} ({column})",
                )
                for name, table, column in DROPPED_INDEXES
            ],
        ),
    ]
