"""Start real services (PostgreSQL, etcd) on random ports in temp dirs, for tests,
benchmarks and the local dev cluster; see :mod:`vim.harness.postgres`,
:mod:`vim.harness.etcd` and :mod:`vim.harness.ports`."""
