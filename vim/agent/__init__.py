"""The compute agent: one per host, reconciling desired state from the log against
libvirt and Open vSwitch (see docs/AGENT.md)."""
