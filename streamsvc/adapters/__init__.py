"""The only modules that talk to servers: PostgreSQL, Redis, RabbitMQ."""
