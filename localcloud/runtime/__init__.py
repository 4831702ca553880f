"""The local Cloud Run runtime: revisions run as local processes behind a front door."""
