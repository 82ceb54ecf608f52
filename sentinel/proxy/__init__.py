"""The traffic port: an OpenAI-compatible proxy in front of the degradation chain.

client -> ``http1`` (our HTTP/1.1 server: framing, limits, timeouts) -> ``ProxyHandler``
(``request``: validation and header policy; ``relay``; payload records) -> ``Chain``
(tiers, breaker, admission) -> ``Transport`` (upstream HTTP client) -> engine / backup /
external API.
"""
