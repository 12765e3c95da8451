"""secrets delivered as files (`--secret-mount`) beside environment variables: their kind

Revision ID: 0006_secret_files
Revises: 0005_api_keys
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006_secret_files"
down_revision = "0005_api_keys"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("secrets") as batch:
        batch.add_column(sa.Column("kind", sa.String(8), nullable=False, server_default="env"))


def downgrade() -> None:
    with op.batch_alter_table("secrets") as batch:
        batch.drop_column("kind")
