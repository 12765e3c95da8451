"""rollout plans (canary, blue-green) and autoscaling policies

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("rollouts") as batch:
        batch.add_column(sa.Column("plan", sa.JSON(), nullable=False, server_default="{}"))
        batch.add_column(sa.Column("weight", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("step_started_at", sa.Float(), nullable=False, server_default="0")
        )
    with op.batch_alter_table("deployments") as batch:
        batch.add_column(sa.Column("autoscale", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("deployments") as batch:
        batch.drop_column("autoscale")
    with op.batch_alter_table("rollouts") as batch:
        batch.drop_column("step_started_at")
        batch.drop_column("weight")
        batch.drop_column("plan")
