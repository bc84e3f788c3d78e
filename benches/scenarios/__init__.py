"""One module per scenario, each with ``async def run(ctx) -> list[ScenarioResult]``.
Modules starting with ``_`` are shared plumbing."""

SCENARIOS: dict[str, str] = {
    "dispatch": "scenarios.dispatch",
    "webhook": "scenarios.webhook",
    "webhook-durable": "scenarios.webhook_durable",
    "webhook-https": "scenarios.webhook_https",
    "cloudevents": "scenarios.cloudevents",
    "nats": "scenarios.nats",
    "jetstream": "scenarios.jetstream",
    "kafka": "scenarios.kafka",
    "rabbitmq": "scenarios.rabbitmq",
    "sqs": "scenarios.sqs",
    "mqtt": "scenarios.mqtt",
    "postgres": "scenarios.postgres",
    "pushbullet": "scenarios.pushbullet",
    "async-callback": "scenarios.async_callback",
    "fanout": "scenarios.fanout",
    "backpressure": "scenarios.backpressure",
    "scaling": "scenarios.scaling",
    "https": "scenarios.https",
    "bridge": "scenarios.bridge",
    "cron": "scenarios.cron",
    "vcenter": "scenarios.vcenter",
}
"""Scenario name → module, in the order a full run goes."""
