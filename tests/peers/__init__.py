"""Real DICOM peers for tests and benchmarks: free ports, managed processes, Orthanc, dcmtk.

These are thin, reusable helpers around the real programs (never mocks). Every process gets
``TCP_NODELAY=1`` and is stopped by its PID.
"""

from tests.peers.dcmtk import (
    FileStatus,
    SendResult,
    StoreSCP,
    dcmsend,
    echoscu,
    parse_dcmsend_report,
    parse_storescu_output,
    storescu,
)
from tests.peers.orthanc import Orthanc, OrthancError
from tests.peers.ports import LOOPBACK, free_port, port_accepts, wait_port_closed
from tests.peers.processes import (
    ManagedProcess,
    PeerError,
    ToolMissingError,
    find_tool,
    in_ci,
    peer_env,
    require_tool,
)

__all__ = [
    "LOOPBACK",
    "FileStatus",
    "ManagedProcess",
    "Orthanc",
    "OrthancError",
    "PeerError",
    "SendResult",
    "StoreSCP",
    "ToolMissingError",
    "dcmsend",
    "echoscu",
    "find_tool",
    "free_port",
    "in_ci",
    "parse_dcmsend_report",
    "parse_storescu_output",
    "peer_env",
    "port_accepts",
    "require_tool",
    "storescu",
    "wait_port_closed",
]
