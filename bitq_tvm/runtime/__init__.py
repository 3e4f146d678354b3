"""Running compiled models: the runner base shared by host, deployed and remote models, and TVM RPC devices."""
