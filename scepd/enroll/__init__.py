"""Enrollment: the pipeline, enrollment service, challenges, renewal, the external check."""
