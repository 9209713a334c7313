"""The lab: a mini Kubernetes cluster built from network namespaces on one machine.

Theory of operation
-------------------
A lab is made from ordinary Kubernetes YAML (Nodes, Pods, Services, EndpointSlices for
selector-less Services) and then lives in a Kubernetes API server of its own, so kubectl
drives it like a cluster. Nothing is pulled: every Pod runs the lab's built-in server
(:mod:`kubeproxy.lab.podserver`) in a network namespace of its own, and every node runs
the real proxy daemon (``kubeproxy run``). See docs/lab.md.

The pieces, pure first:

``manifest``   raw YAML documents -> typed records (validated; errors name object + field)
``layout``     records -> a complete plan: IP/port allocation, namespaces, links, routes
``controller`` Pods + Services + Nodes -> EndpointSlices, as kube-controller-manager does
``objects``    the plan as API objects (``lab up``); the Pod status kubelet would write
``view``       the running lab as the API describes it (find a pod, a ClusterIP, ...)
``diagram``    a node's views + its mode's chain names -> an SVG of the packet's path
``nodeviews``  a lab node's views, from its API server, as its proxy decides them
``netns``      the one adapter that runs ``ip netns`` / ``ip link`` / ``ip addr`` / sysctl
``network``    plan -> namespaces and links (base network at up; one Pod at a time)
``api``        the lab's client of its API server (get, list, watch, create, update, delete)
``watchcache`` a list+watch cache of one kind of raw object
``kubelet``    Pods bound to lab nodes -> namespaces, IPs, servers, pod status
``agent``      the per-lab process: kubelet, scheduler, LB and endpoint controllers
``converge``   waiting until the API's state is in every node's rules (bounded)
``deploy``     deploy/ on a lab started without proxies: the manifests, edited for a
               test's mode or kubeadm's ConfigMap, applied; waiting until they serve
``nsconnect``  HTTP to 127.0.0.1 inside a node namespace (the proxies' /metrics)
``processes``  starting the lab's processes detached, recognising and stopping them
``runtime``    ``Lab``: up, down, change, probe
``probe``      a client run inside a namespace; counts answers per backend
``cli``        ``kubeproxy lab ...``

Everything lives in namespaces named ``kpl-<lab>-...``; the machine's root namespace is
never changed and no lab namespace is linked to it; the only thing in the root namespace
is the lab's API server listening on 127.0.0.1.

This package's ``__init__`` stays import-light on purpose: the pod server and the probe
start once per pod / request batch with ``python -m``.
"""
