"""Real Redis topologies (a Sentinel group, a Redis Cluster) for the tests here. The fixtures (``sentinel_group``,
``redis_cluster``, ``cluster_url``) live in ``tests.support.redis_topology`` and are registered once, in
``tests/conftest.py``, so that the store contract suites share the same session cluster."""
