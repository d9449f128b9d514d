"""Usage reports: the one document shape shared by ``meter rate`` and ``meter report``."""

from meter.report.render import FORMATS, UsageReport, render

__all__ = ["FORMATS", "UsageReport", "render"]
