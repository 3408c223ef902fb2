"""Chat client (HTTP only), conversation state, ratings store and export (issue 6)."""
