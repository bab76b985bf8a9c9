"""Alerts before the limit (docs/alerts.md): threshold crossings, their forecast,
the `tally.alerts` topic and Standard Webhooks deliveries.

`rules` and `forecast` are pure; `store` is the data access; `signing` the
Standard Webhooks scheme, secrets and the SSRF check; `dispatch` delivers;
`evaluator` ties them to the sink's writes.
"""
