"""Optional gateway (extra `[gateway]`): API keys, scopes, rate limits and an audit log."""
