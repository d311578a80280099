"""series origin, late series, completion clock and reason

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05

Series.origin tells acquired series from mednode's own results returned by a PACS and from
other derived objects (issue 12); Series.late_at and held_reason record late series and why
they did not reopen their study; Study.receiving_since is the clock of a rule's
``completion.max_wait_s`` and Study.completion_reason says why a study counted as complete.
Result.series_instance_uid gets an index: a returned result is recognised by its series.
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_ORIGIN = sa.Enum('acquired', 'mednode_result', 'derived', name='seriesorigin', native_enum=False, length=20)


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('origin', _ORIGIN, server_default='acquired', nullable=False))
        batch_op.add_column(sa.Column('late_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('held_reason', sa.Text(), nullable=True))
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.add_column(sa.Column('receiving_since', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('completion_reason', sa.Text(), nullable=True))
    with op.batch_alter_table('result', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_result_series_instance_uid'), ['series_instance_uid'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('result', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_result_series_instance_uid'))
    with op.batch_alter_table('study', schema=None) as batch_op:
        batch_op.drop_column('completion_reason')
        batch_op.drop_column('receiving_since')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('held_reason')
        batch_op.drop_column('late_at')
        batch_op.drop_column('origin')
