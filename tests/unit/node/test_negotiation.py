"""Transfer syntax ranking of the listener (node.listener.sender_order): pure, no network."""

from __future__ import annotations

from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES

from node.listener import ACCEPTED_TRANSFER_SYNTAXES, LOSSLESS_TRANSFER_SYNTAXES, sender_order

JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LOSSLESS = "1.2.840.10008.1.2.4.70"
J2K = "1.2.840.10008.1.2.4.91"
RLE = "1.2.840.10008.1.2.5"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
SUPPORTED = [UID(ts) for ts in ACCEPTED_TRANSFER_SYNTAXES]


def test_one_context_keeps_the_senders_order_with_lossless_first() -> None:
    proposal = [JPEG_BASELINE, J2K, JPEG_LOSSLESS, EXPLICIT_LE, IMPLICIT_LE]
    assert sender_order([proposal], SUPPORTED) == [JPEG_LOSSLESS, EXPLICIT_LE, IMPLICIT_LE, JPEG_BASELINE, J2K]
    assert sender_order([[IMPLICIT_LE, EXPLICIT_LE, RLE]], SUPPORTED) == [IMPLICIT_LE, EXPLICIT_LE, RLE]
    assert sender_order([[J2K, JPEG_BASELINE]], SUPPORTED) == [J2K, JPEG_BASELINE]


def test_unsupported_and_repeated_syntaxes_are_left_out() -> None:
    assert sender_order([[EXPLICIT_LE, "1.2.3.4.5", EXPLICIT_LE]], SUPPORTED) == [EXPLICIT_LE]
    assert sender_order([["1.2.3.4.5"]], SUPPORTED) == []


def test_returns_uids() -> None:
    """pynetdicom reads the accepted syntax as a UID (``is_implicit_VR``…), never a plain str."""
    [first] = sender_order([[EXPLICIT_LE]], SUPPORTED)
    assert isinstance(first, UID) and first == EXPLICIT_LE


def test_one_context_per_file_syntax_each_gets_its_own_first() -> None:
    """dcmsend's proposal: a context per file syntax, with the uncompressed ones as fallback."""
    fallback = [EXPLICIT_LE, EXPLICIT_BE, IMPLICIT_LE]
    proposals = [fallback, [JPEG_LOSSLESS, *fallback], [RLE, *fallback], [J2K]]
    order = sender_order(proposals, SUPPORTED)
    for proposal in proposals:
        chosen = next(ts for ts in order if ts in proposal)  # what pynetdicom accepts for it
        assert chosen == proposal[0], (proposal, order)


def test_base_list_ranks_every_lossless_syntax_before_any_lossy_one() -> None:
    assert sorted(ACCEPTED_TRANSFER_SYNTAXES) == sorted(ALL_TRANSFER_SYNTAXES)
    lossless = [ts in LOSSLESS_TRANSFER_SYNTAXES for ts in ACCEPTED_TRANSFER_SYNTAXES]
    assert lossless == sorted(lossless, reverse=True)
    assert JPEG_BASELINE not in LOSSLESS_TRANSFER_SYNTAXES and J2K not in LOSSLESS_TRANSFER_SYNTAXES
