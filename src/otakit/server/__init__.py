"""The update server: device API, management API, deployments, stores."""
