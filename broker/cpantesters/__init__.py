"""The CPAN Testers report pipeline: the v3 API, report validation, summaries and statistics."""
