"""Weight-free analyzers that ship with mednode and need no model download."""

from inference.builtin.ct_analyzer import (
    ANALYZER_NAME,
    ANALYZER_VERSION,
    CTAnalysis,
    CTAnalyzerParams,
    StructureStats,
    analyze_ct,
)

__all__ = [
    "ANALYZER_NAME",
    "ANALYZER_VERSION",
    "CTAnalysis",
    "CTAnalyzerParams",
    "StructureStats",
    "analyze_ct",
]
