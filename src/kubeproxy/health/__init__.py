"""What the node tells others about the proxy: /healthz and /livez, health-check node
ports for load balancers, and the metrics."""
