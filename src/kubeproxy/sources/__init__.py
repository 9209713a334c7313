"""Where objects come from: the Kubernetes API server (list + watch).

``kubeconfig`` finds the server and the credentials, ``client`` speaks the API's JSON
over HTTP(S) with the standard library, ``informer`` keeps one resource in sync with
list + watch and hands decoded updates to the daemon.
"""
