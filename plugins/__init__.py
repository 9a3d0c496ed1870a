"""The built-in plugins of geproxy, registered from geproxy.policy.plugins.DEFAULT_PLUGINS.

They use only geproxy's public API, exactly as a third-party plugin would.
"""
