{{/*
Labels Helm adds to every object's metadata (never to selectors or pod templates: those
match manifests/ exactly, and the alert rules take the job name from app.kubernetes.io/name).
scripts/check-helm.sh strips exactly these before comparing with `kubectl kustomize manifests`.
*/}}
{{- define "kube-migrate.labels" -}}
app.kubernetes.io/part-of: kube-migrate
app.kubernetes.io/instance: {{ .Release.Name | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service | quote }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | quote }}
{{- end }}

{{/* An image reference: repository@digest, else repository:tag (tag default: appVersion). */}}
{{- define "kube-migrate.image" -}}
{{- if .image.digest -}}
{{ .image.repository }}@{{ .image.digest }}
{{- else -}}
{{ .image.repository }}:{{ .image.tag | default .root.Chart.AppVersion }}
{{- end -}}
{{- end }}

{{/* env entries for the values that are set (a dict NAME -> value; null: not set). */}}
{{- define "kube-migrate.optionalEnv" -}}
{{- range $name, $value := . }}
{{- if not (kindIs "invalid" $value) }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* namespaceSelector expressions of both webhooks: never the excluded namespaces. */}}
{{- define "kube-migrate.namespaceExpressions" -}}
- key: kubernetes.io/metadata.name
  operator: NotIn
  values: {{ concat .Values.webhooks.excludedNamespaces (list .Release.Namespace) | uniq | toJson }}
{{- with .Values.webhooks.matchExpressions }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
caBundle of both webhook configurations (certs-tool): tls.caBundle, else the one already in
the cluster (certs/install.sh patched it; a render without a cluster finds none), else "".
*/}}
{{- define "kube-migrate.caBundle" -}}
{{- if .Values.tls.caBundle -}}
{{ .Values.tls.caBundle | b64enc }}
{{- else -}}
{{- $live := lookup "admissionregistration.k8s.io/v1" "ValidatingWebhookConfiguration" "" "kube-migrate-eviction" -}}
{{- if $live -}}
{{ (index $live.webhooks 0).clientConfig.caBundle | default "" }}
{{- end -}}
{{- end -}}
{{- end }}

{{- define "kube-migrate.validate" -}}
{{- if not (has .Values.tls.source (list "certs-tool" "cert-manager")) -}}
{{- fail (printf "tls.source must be certs-tool or cert-manager, not %q" .Values.tls.source) -}}
{{- end -}}
{{- if and (eq .Values.tls.source "cert-manager") .Values.tls.caBundle -}}
{{- fail "tls.caBundle is for tls.source=certs-tool; with cert-manager its CA injector fills the caBundle" -}}
{{- end -}}
{{- end }}
