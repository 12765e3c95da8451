"""jobs dispatched again when their worker dies: restart policy and count

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("restart_policy", sa.Integer(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("redispatches", sa.Integer(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("dispatches") as batch:
        batch.add_column(
            sa.Column("restart_policy", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    with op.batch_alter_table("dispatches") as batch:
        batch.drop_column("restart_policy")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("redispatches")
        batch.drop_column("restart_policy")
