"""per-stage clock of a job

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05

Job.stage_s holds the seconds a job's worker spent in each pipeline stage (load, model, write,
store), so a study's timeline and ``/metrics`` can split the time from its last instance to
its results in the PACS (issue 16). The other moments (completed, enqueued, started, finished,
delivered) were already columns.
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.add_column(sa.Column('stage_s', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('job', schema=None) as batch_op:
        batch_op.drop_column('stage_s')
