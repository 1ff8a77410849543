"""Composite foreign keys Django cannot express: they make PostgreSQL itself refuse a comparison
whose samples belong to another prompt, or a sample/comparison whose prompt is another project's."""

from django.db import migrations

FKS = [
    (
        "annotate_comparisonsample",
        "compsample_sample_same_prompt",
        "(sample_id, prompt_id)",
        "annotate_sample (id, prompt_id)",
    ),
    (
        "annotate_comparisonsample",
        "compsample_comparison_same_prompt",
        "(comparison_id, prompt_id)",
        "annotate_comparison (id, prompt_id)",
    ),
    (
        "annotate_sample",
        "sample_prompt_same_project",
        "(prompt_id, project_id)",
        "annotate_prompt (id, project_id)",
    ),
    (
        "annotate_comparison",
        "comparison_prompt_same_project",
        "(prompt_id, project_id)",
        "annotate_prompt (id, project_id)",
    ),
]


class Migration(migrations.Migration):
    dependencies = [("annotate", "0001_initial")]

    operations = [
        migrations.RunSQL(
            sql=f"ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY {cols} REFERENCES {ref} "
            "ON DELETE CASCADE",
            reverse_sql=f"ALTER TABLE {table} DROP CONSTRAINT {name}",
        )
        for table, name, cols, ref in FKS
    ]
