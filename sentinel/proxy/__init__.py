"""The traffic port: an OpenAI-compatible proxy in front of the degradation chain.

request -> ``ProxyApp`` (ASGI, validation, relay) -> ``Chain`` (tiers, breaker,
admission) -> ``Transport`` (upstream HTTP client) -> engine / backup / external API.
"""
