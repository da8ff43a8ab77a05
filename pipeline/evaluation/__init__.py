"""Evaluation: metrics (in memory and streamed), scoring a target store for a report (evaluate), and the
figures (report)."""
