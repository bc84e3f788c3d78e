"""Event sources. Each module ``fastconn.sources.<type>`` is one ``[[sources]]`` type and exposes
``CONFIG_MODEL``, the pydantic model its ``[[sources]]`` table is validated with."""
