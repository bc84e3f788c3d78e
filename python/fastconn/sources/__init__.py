"""Event sources. Each module or package ``fastconn.sources.<type>`` is one ``[[sources]]`` type
and exposes ``CONFIG_MODEL``, the pydantic model its ``[[sources]]`` table is validated with, and
``create(config)``. Names starting with ``_`` are shared helpers, not types."""
