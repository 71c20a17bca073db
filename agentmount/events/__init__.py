"""Change events derived from the journal and their delivery to webhooks."""
