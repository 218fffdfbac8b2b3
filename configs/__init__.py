"""The shipped run configs (YAML data): ``moelora fit -c demo.yaml`` finds them when installed."""
