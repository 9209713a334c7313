"""The lab: a mini Kubernetes cluster built from network namespaces on one machine.

Theory of operation
-------------------
A lab is made from ordinary Kubernetes YAML (Nodes, Pods, Services, EndpointSlices for
selector-less Services). Nothing is pulled or scheduled: every Pod runs the lab's built-in
server (:mod:`kubeproxy.lab.podserver`) in a network namespace of its own.

The pieces, pure first:

``manifest``   raw YAML documents -> typed records (validated; errors name object + field)
``topology``   records -> a complete plan: IP/port allocation, namespaces, links, routes
``controller`` Pods + Services + Nodes -> EndpointSlices, as kube-controller-manager does
``diagram``    rules read from a node -> an SVG of the packet's path
``netns``      the one adapter that runs ``ip netns`` / ``ip link`` / ``ip addr`` / sysctl
``runtime``    executes a plan, starts pod servers, programs each node via
               ``python -m kubeproxy apply`` run inside the node's namespace
``probe``      a client run inside a namespace; counts answers per backend
``cli``        ``kubeproxy lab ...``

Everything lives in namespaces named ``kpl-<lab>-...``; the machine's root namespace is
never changed and no lab namespace is linked to it.

This package's ``__init__`` stays import-light on purpose: the pod server and the probe
start once per pod / request batch with ``python -m``.
"""
