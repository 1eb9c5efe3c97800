"""The reports: a study (and its final stage) as one offline HTML file."""

from .study import build_report, write_report

__all__ = ["build_report", "write_report"]
