"""geproxy-blocklist: an example third-party policy plugin for geproxy."""

from setuptools import setup

setup(
    name="geproxy-blocklist",
    version="0.1.0",
    description="geproxy plugin: refuse destinations listed in a file, reloaded on change",
    packages=["geproxy_blocklist"],
    python_requires=">=3.11",
    install_requires=["geproxy"],
    entry_points={"geproxy": ["blocklist = geproxy_blocklist:Blocklist"]},
)
