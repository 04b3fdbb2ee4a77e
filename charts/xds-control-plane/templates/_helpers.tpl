{{/* The chart name, and the full name of the objects (at most 63 characters: a DNS label). */}}
{{- define "xds.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "xds.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "xds.envoyName" -}}
{{- printf "%s-envoy" (include "xds.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The labels of every object; pods add their selector labels to the common ones. */}}
{{- define "xds.labels" -}}
app.kubernetes.io/name: {{ include "xds.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{ include "xds.commonLabels" . }}
{{- end }}

{{- define "xds.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: xds-control-plane
{{- end }}

{{/* The control plane's pods. */}}
{{- define "xds.selectorLabels" -}}
app.kubernetes.io/name: {{ include "xds.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: control-plane
{{- end }}

{{/* The node proxies' pods. */}}
{{- define "xds.envoySelectorLabels" -}}
app.kubernetes.io/name: {{ include "xds.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: envoy
{{- end }}

{{- define "xds.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "xds.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given. */}}
{{- define "xds.image" -}}
{{- if .digest }}
{{- printf "%s@%s" .repository .digest }}
{{- else }}
{{- if or (not .tag) (eq (toString .tag) "latest") }}
{{- fail (printf "image %s: pin an exact tag or a digest, not %q" .repository (toString .tag)) }}
{{- end }}
{{- printf "%s:%s" .repository (toString .tag) }}
{{- end }}
{{- end }}

{{/* The manifests ConfigMap: the existing one named, else the chart's own. */}}
{{- define "xds.manifestsConfigMap" -}}
{{- if .Values.source.manifests.configMap }}
{{- .Values.source.manifests.configMap }}
{{- else if .Values.source.manifests.files }}
{{- printf "%s-manifests" (include "xds.fullname" .) }}
{{- else }}
{{- fail "source.type manifests needs source.manifests.configMap or source.manifests.files" }}
{{- end }}
{{- end }}

{{- define "xds.kubernetesSource" -}}
{{- if eq .Values.source.type "kubernetes" }}true{{ else if eq .Values.source.type "manifests" }}{{ else }}{{ fail (printf "source.type must be kubernetes or manifests, not %q" .Values.source.type) }}{{ end }}
{{- end }}

{{/* Where proxies reach xDS: the Service's cluster DNS name (the name a TLS certificate must carry). */}}
{{- define "xds.serviceHost" -}}
{{- printf "%s.%s.svc.%s" (include "xds.fullname" .) .Release.Namespace .Values.clusterDomain }}
{{- end }}

{{/* A NetworkPolicy peer from {namespaces, namespaceSelector, podSelector}; `root` is the chart's context. */}}
{{- define "xds.peer" -}}
{{- $peer := .peer -}}
- namespaceSelector:
{{- if $peer.namespaceSelector }}
    {{- toYaml $peer.namespaceSelector | nindent 4 }}
{{- else }}
    matchExpressions:
      - key: kubernetes.io/metadata.name
        operator: In
        values:
        {{- range (default (list .root.Release.Namespace) $peer.namespaces) }}
          - {{ . | quote }}
        {{- end }}
{{- end }}
  podSelector:
    {{- toYaml (default (dict) $peer.podSelector) | nindent 4 }}
{{- end }}

{{/* The TLS files of the control plane, in its Secret volume. */}}
{{- define "xds.tlsDir" -}}/etc/xds/tls{{- end }}
{{- define "xds.manifestsDir" -}}/etc/xds/manifests{{- end }}
{{/* The Envoy bootstrap's directory, and that of its TLS files and SDS files. */}}
{{- define "xds.envoyBootstrapDir" -}}/etc/envoy/bootstrap{{- end }}
{{- define "xds.envoyTlsDir" -}}/etc/envoy/tls{{- end }}

{{/* The `xds serve` arguments. tests/integration/test_helm.py parses them with the real CLI. */}}
{{- define "xds.args" -}}
- serve
{{- if include "xds.kubernetesSource" . }}
- --kubernetes
{{- range .Values.source.kubernetes.namespaces }}
- --namespace={{ . }}
{{- end }}
{{- else }}
- --manifests={{ include "xds.manifestsDir" . }}
{{- end }}
- --xds-host=0.0.0.0
- --xds-port={{ .Values.xds.port }}
# /debug/* shows every resource and client: loopback only (kubectl port-forward reaches it for
# `xds status`); probes and scraping use the health port.
- --admin-port={{ .Values.adminPort }}
- --health-host=0.0.0.0
- --health-port={{ .Values.healthPort }}
- --listener-port-offset={{ .Values.listenerPortOffset }}
- --cluster-domain={{ .Values.clusterDomain }}
- --log-level={{ .Values.logLevel }}
- --log-format={{ .Values.logFormat }}
{{- if .Values.xds.tls.secretName }}
- --tls-cert={{ include "xds.tlsDir" . }}/tls.crt
- --tls-key={{ include "xds.tlsDir" . }}/tls.key
{{- if .Values.xds.tls.requireClientCertificates }}
- --tls-client-ca={{ include "xds.tlsDir" . }}/ca.crt
{{- if .Values.xds.tls.trustDomain }}
- --trust-domain={{ .Values.xds.tls.trustDomain }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.xds.maxConnectionAge }}
- --max-connection-age={{ .Values.xds.maxConnectionAge }}
{{- end }}
{{- if .Values.localityAware }}
- --locality-aware
{{- end }}
{{- if .Values.tracing.envoyCollector }}
- --tracing-cluster=otel_collector
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end }}

{{/* The Envoy bootstrap, as `xds bootstrap` writes it (test_helm.py compares the two):
  xds bootstrap --node-id node-proxy --node-cluster CLUSTER --xds-address HOST:PORT
    --admin-port PORT --namespace RELEASE-NAMESPACE [--otel-collector HOST:PORT]
    [--tls-dir /etc/envoy/tls] */}}
{{- define "xds.envoyBootstrap" -}}
{{- $host := include "xds.serviceHost" . -}}
{{- $tlsDir := include "xds.envoyTlsDir" . -}}
node:
  id: node-proxy
  cluster: {{ .Values.envoy.nodeCluster | quote }}
  metadata:
    NAMESPACE: {{ .Release.Namespace | quote }}
admin:
  address:
    socket_address: {address: 127.0.0.1, port_value: {{ .Values.envoy.adminPort }}}
dynamic_resources:
  ads_config:
    api_type: GRPC
    transport_api_version: V3
    grpc_services:
      - envoy_grpc: {cluster_name: xds_cluster}
    set_node_on_first_message_only: true
  cds_config: {ads: {}, resource_api_version: V3}
  lds_config: {ads: {}, resource_api_version: V3}
static_resources:
  clusters:
    - name: xds_cluster
      {{- include "xds.envoyGrpcCluster" (dict "name" "xds_cluster" "host" $host "port" .Values.xds.port) | nindent 6 }}
      {{- if .Values.xds.tls.secretName }}
      transport_socket:
        name: envoy.transport_sockets.tls
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext
          common_tls_context:
            alpn_protocols: [h2]
            tls_certificate_sds_secret_configs:
              - name: xds_client_certificate
                sds_config:
                  path_config_source:
                    path: {{ $tlsDir }}/xds_client_certificate.yaml
                    watched_directory: {path: {{ $tlsDir }}}
                  resource_api_version: V3
            combined_validation_context:
              default_validation_context:
                match_typed_subject_alt_names:
                  - san_type: DNS
                    matcher: {exact: {{ $host | quote }}}
              validation_context_sds_secret_config:
                name: xds_validation_context
                sds_config:
                  path_config_source:
                    path: {{ $tlsDir }}/xds_validation_context.yaml
                    watched_directory: {path: {{ $tlsDir }}}
                  resource_api_version: V3
          sni: {{ $host | quote }}
      {{- end }}
    {{- with .Values.tracing.envoyCollector }}
    {{- $collector := splitList ":" . }}
    - name: otel_collector
      {{- include "xds.envoyGrpcCluster" (dict "name" "otel_collector" "host" (first $collector) "port" (last $collector)) | nindent 6 }}
    {{- end }}
layered_runtime:
  layers:
    - {name: static, static_layer: {}}
    - {name: admin, admin_layer: {}}
{{- end }}

{{/* A static cluster speaking HTTP/2 (gRPC) to a DNS name (xds.bootstrap.grpc_cluster). */}}
{{- define "xds.envoyGrpcCluster" -}}
type: {{ if regexMatch "^[0-9.]+$" (toString .host) }}STATIC{{ else }}STRICT_DNS{{ end }}
connect_timeout: 1s
typed_extension_protocol_options:
  envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
    "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
    explicit_http_config: {http2_protocol_options: {}}
load_assignment:
  cluster_name: {{ .name }}
  endpoints:
    - lb_endpoints:
        - endpoint:
            address:
              socket_address: {address: {{ .host | quote }}, port_value: {{ .port }}}
{{- end }}

{{/* The SDS files of the Envoy bootstrap's TLS (xds bootstrap --tls-dir DIR --write-sds). */}}
{{- define "xds.envoySdsFiles" -}}
{{- $dir := include "xds.envoyTlsDir" . -}}
{{- $certificate := dict "@type" "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret" "name" "xds_client_certificate" "tls_certificate" (dict "certificate_chain" (dict "filename" (printf "%s/tls.crt" $dir)) "private_key" (dict "filename" (printf "%s/tls.key" $dir)) "watched_directory" (dict "path" $dir)) -}}
{{- $validation := dict "@type" "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret" "name" "xds_validation_context" "validation_context" (dict "trusted_ca" (dict "filename" (printf "%s/ca.crt" $dir)) "watched_directory" (dict "path" $dir)) -}}
xds_client_certificate.yaml: {{ dict "resources" (list $certificate) | toPrettyJson | quote }}
xds_validation_context.yaml: {{ dict "resources" (list $validation) | toPrettyJson | quote }}
{{- end }}
