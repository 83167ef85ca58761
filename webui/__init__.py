"""The web UI: pages and static assets served by the broker, and the browser client library."""
