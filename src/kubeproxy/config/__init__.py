"""The proxy's configuration: ProxyConfig and the mode names (types), the
KubeProxyConfiguration file (v1alpha1), the flag table and flags -> ProxyConfig (flags)."""
