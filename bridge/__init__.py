"""one-bridge: ONe webhook callbacks to RabbitMQ."""

__version__ = "0.1.0"
