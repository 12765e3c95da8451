"""versions carry the container image they run as (the Kubernetes runtime)

Revision ID: 0007_version_image
Revises: 0006_secret_files
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_version_image"
down_revision = "0006_secret_files"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.add_column(sa.Column("image", sa.Text(), nullable=False, server_default=""))
        batch.add_column(
            sa.Column("image_digest", sa.String(length=80), nullable=False, server_default="")
        )


def downgrade() -> None:
    with op.batch_alter_table("versions") as batch:
        batch.drop_column("image_digest")
        batch.drop_column("image")
