"""API keys with roles; where each event came from

Revision ID: 0005_api_keys
Revises: 0004

Named `0005_api_keys`, not `0005`: another migration numbered 5 may be made on another branch;
whichever merges second re-chains its `down_revision` to the other.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005_api_keys"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=40), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False, server_default=""),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("agent_id", sa.String(length=32), nullable=False, server_default=""),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=100), nullable=False, server_default=""),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=False, server_default="0"),
        sa.Column("revoked_at", sa.Float(), nullable=False, server_default="0"),
        sa.Column("last_used_at", sa.Float(), nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("ip", sa.String(length=64), nullable=False, server_default=""))
    op.create_index("ix_events_at", "events", ["at"])


def downgrade() -> None:
    op.drop_index("ix_events_at", table_name="events")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("ip")
    op.drop_table("api_keys")
