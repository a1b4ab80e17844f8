{{/*
Shared template helpers. Components call the pod-level helpers with a dict:
  (dict "root" $ "component" "sts" "rings" (list "bus" "internal" "seal" "pepper"))
plus "interceptCa" true for the gateway (mounts the TLS interception CA).
*/}}

{{/* Chart name, possibly overridden. */}}
{{- define "caracal.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name: the release name (plus "-caracal" unless it contains it). */}}
{{- define "caracal.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "caracal.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of every object; pass (dict "root" $ "component" "gateway") or just $. */}}
{{- define "caracal.labels" -}}
{{- $root := .root | default . -}}
helm.sh/chart: {{ include "caracal.chart" $root }}
app.kubernetes.io/name: {{ include "caracal.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/part-of: caracal
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{/* Selector labels of one component. */}}
{{- define "caracal.selectorLabels" -}}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "caracal.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "caracal.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "caracal.secretName" -}}
{{- default (printf "%s-secrets" (include "caracal.fullname" .)) .Values.secrets.name -}}
{{- end -}}

{{- define "caracal.configName" -}}
{{- printf "%s-config" (include "caracal.fullname" .) -}}
{{- end -}}

{{- define "caracal.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Pod template metadata shared by every component (labels, config checksum). */}}
{{- define "caracal.podMetadata" -}}
labels:
  {{- include "caracal.labels" (dict "root" .root "component" .component) | nindent 2 }}
  {{- with .root.Values.podLabels }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
annotations:
  checksum/config: {{ include (print .root.Template.BasePath "/configmap.yaml") .root | sha256sum }}
  {{- with .root.Values.podAnnotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end -}}

{{/* Pod-level settings shared by every Caracal pod. */}}
{{- define "caracal.podCommon" -}}
serviceAccountName: {{ include "caracal.serviceAccountName" .root }}
automountServiceAccountToken: false
enableServiceLinks: false
{{- with .root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
securityContext:
  {{- toYaml .root.Values.podSecurityContext | nindent 2 }}
{{- end -}}

{{/* Environment every Caracal container gets: config path, database and Redis URLs. */}}
{{- define "caracal.commonEnv" -}}
- name: CARACAL_CONFIG
  value: /etc/caracal/caracal.toml
- name: CARACAL__DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ include "caracal.secretName" .root }}
      key: database-url
- name: CARACAL__BUS__REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "caracal.secretName" .root }}
      key: redis-url
{{- if has "seal" .rings }}
- name: CARACAL__KEYS__SEAL__ACTIVE
  value: {{ .root.Values.keys.seal.active | quote }}
{{- range $id, $entry := .root.Values.keys.seal.keys }}
- name: CARACAL__KEYS__SEAL__KEYS__{{ upper $id }}
  value: {{ printf "file:/run/secrets/caracal/%s" $entry | quote }}
{{- end }}
{{- end }}
{{- if has "pepper" .rings }}
- name: CARACAL__KEYS__PEPPER__ACTIVE
  value: {{ .root.Values.keys.pepper.active | quote }}
{{- range $id, $entry := .root.Values.keys.pepper.keys }}
- name: CARACAL__KEYS__PEPPER__KEYS__{{ upper $id }}
  value: {{ printf "file:/run/secrets/caracal/%s" $entry | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Probes on the named port (/healthz alive, /readyz dependencies reachable). */}}
{{- define "caracal.probes" -}}
startupProbe:
  httpGet:
    path: /healthz
    port: {{ .port }}
  periodSeconds: {{ .root.Values.probes.startup.periodSeconds }}
  failureThreshold: {{ .root.Values.probes.startup.failureThreshold }}
livenessProbe:
  httpGet:
    path: /healthz
    port: {{ .port }}
  periodSeconds: {{ .root.Values.probes.liveness.periodSeconds }}
  timeoutSeconds: {{ .root.Values.probes.liveness.timeoutSeconds }}
  failureThreshold: {{ .root.Values.probes.liveness.failureThreshold }}
readinessProbe:
  httpGet:
    path: /readyz
    port: {{ .port }}
  periodSeconds: {{ .root.Values.probes.readiness.periodSeconds }}
  timeoutSeconds: {{ .root.Values.probes.readiness.timeoutSeconds }}
  failureThreshold: {{ .root.Values.probes.readiness.failureThreshold }}
{{- end -}}

{{- define "caracal.volumeMounts" -}}
- name: config
  mountPath: /etc/caracal
  readOnly: true
- name: keys
  mountPath: /run/secrets/caracal
  readOnly: true
- name: data
  mountPath: /var/lib/caracal
{{- end -}}

{{/* Volumes: the config, only the key files of the rings this component uses (and the
interception CA for the gateway), a data dir. */}}
{{- define "caracal.volumes" -}}
- name: config
  configMap:
    name: {{ include "caracal.configName" .root }}
- name: keys
  secret:
    secretName: {{ include "caracal.secretName" .root }}
    defaultMode: 0440
    items:
      {{- range $id, $entry := .root.Values.keys.bus.keys }}
      - key: {{ $entry }}
        path: {{ $entry }}
      {{- end }}
      {{- range $id, $entry := .root.Values.keys.internal.keys }}
      - key: {{ $entry }}
        path: {{ $entry }}
      {{- end }}
      {{- if has "seal" .rings }}
      {{- range $id, $entry := .root.Values.keys.seal.keys }}
      - key: {{ $entry }}
        path: {{ $entry }}
      {{- end }}
      {{- end }}
      {{- if has "pepper" .rings }}
      {{- range $id, $entry := .root.Values.keys.pepper.keys }}
      - key: {{ $entry }}
        path: {{ $entry }}
      {{- end }}
      {{- end }}
      {{- if .interceptCa }}
      - key: {{ .root.Values.interceptCa.secretEntry }}
        path: {{ .root.Values.interceptCa.secretEntry }}
      {{- end }}
- name: data
  emptyDir:
    medium: Memory
    sizeLimit: 16Mi
{{- end -}}

{{/* preStop delay so endpoints drop the pod before it stops accepting. */}}
{{- define "caracal.lifecycle" -}}
preStop:
  exec:
    command: ["sleep", "{{ .Values.preStopSleepSeconds }}"]
{{- end -}}
