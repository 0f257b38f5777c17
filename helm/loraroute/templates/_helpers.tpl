{{/* Chart name, shortened to 63 characters. */}}
{{- define "loraroute.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name prefix: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "loraroute.fullname" -}}
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

{{- define "loraroute.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "loraroute.labels" -}}
helm.sh/chart: {{ include "loraroute.chart" . }}
app.kubernetes.io/name: {{ include "loraroute.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: loraroute
{{- end -}}

{{/* Selector labels for one component: include "loraroute.selector" (list . "gateway") */}}
{{- define "loraroute.selector" -}}
{{- $ctx := index . 0 -}}
app.kubernetes.io/name: {{ include "loraroute.name" $ctx }}
app.kubernetes.io/instance: {{ $ctx.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{/* Image reference with the optional mirror prefix: include "loraroute.image" (list . .Values.image) */}}
{{- define "loraroute.image" -}}
{{- $ctx := index . 0 -}}
{{- $img := index . 1 -}}
{{- $tag := $img.tag | default $ctx.Chart.AppVersion -}}
{{- if $ctx.Values.imageRegistry -}}
{{- printf "%s/%s:%s" (trimSuffix "/" $ctx.Values.imageRegistry) $img.repository $tag -}}
{{- else -}}
{{- printf "%s:%s" $img.repository $tag -}}
{{- end -}}
{{- end -}}

{{- define "loraroute.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (printf "%s-gateway" (include "loraroute.fullname" .)) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "loraroute.gatewaySecretName" -}}
{{- default (printf "%s-gateway-auth" (include "loraroute.fullname" .)) .Values.gateway.auth.existingSecret -}}
{{- end -}}

{{/* Name of the vLLM InferenceService (KServe mode) */}}
{{- define "loraroute.isvcName" -}}
{{- printf "%s-vllm" (include "loraroute.fullname" .) | trunc 45 | trimSuffix "-" -}}
{{- end -}}

{{/* Label selector string of the vLLM pods the gateway watches. */}}
{{- define "loraroute.vllmSelector" -}}
{{- if .Values.discovery.labelSelector -}}
{{- .Values.discovery.labelSelector -}}
{{- else if eq .Values.vllm.mode "kserve" -}}
{{- printf "serving.kserve.io/inferenceservice=%s" (include "loraroute.isvcName" .) -}}
{{- else -}}
{{- printf "app.kubernetes.io/instance=%s,app.kubernetes.io/component=vllm" .Release.Name -}}
{{- end -}}
{{- end -}}

{{/* Pod selector (matchLabels) of the vLLM pods, for NetworkPolicy and PodMonitor. */}}
{{- define "loraroute.vllmPodLabels" -}}
{{- if eq .Values.vllm.mode "kserve" -}}
serving.kserve.io/inferenceservice: {{ include "loraroute.isvcName" . }}
{{- else -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: vllm
{{- end -}}
{{- end -}}

{{/* Redis: in-cluster service name */}}
{{- define "loraroute.redisName" -}}
{{- printf "%s-redis" (include "loraroute.fullname" .) -}}
{{- end -}}

{{/* Redis URL without password (the password comes from the environment). */}}
{{- define "loraroute.redisUrl" -}}
{{- if .Values.redis.enabled -}}
{{- printf "redis://%s.%s.svc:%d/0" (include "loraroute.redisName" .) .Release.Namespace (int .Values.redis.port) -}}
{{- else -}}
{{- required "redis.external.url is required when redis.enabled is false" .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/* Secret + key holding the Redis password, as "name key", or "" when none. */}}
{{- define "loraroute.redisPasswordSecret" -}}
{{- if .Values.redis.enabled -}}
{{- if .Values.redis.auth.enabled -}}
{{- printf "%s %s" (default (include "loraroute.redisName" .) .Values.redis.auth.existingSecret) .Values.redis.auth.passwordKey -}}
{{- end -}}
{{- else if .Values.redis.external.existingSecret -}}
{{- printf "%s %s" .Values.redis.external.existingSecret .Values.redis.external.passwordKey -}}
{{- end -}}
{{- end -}}

{{/* EnvVar REDIS_PASSWORD when Redis needs one. */}}
{{- define "loraroute.redisPasswordEnv" -}}
{{- $s := include "loraroute.redisPasswordSecret" . -}}
{{- if $s -}}
{{- $parts := splitList " " $s -}}
- name: LORAROUTE_REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ index $parts 0 }}
      key: {{ index $parts 1 }}
{{- end -}}
{{- end -}}

{{/* Redis URL carrying the password from the environment, for LORAROUTE__STORE__URL-style
overrides: <scheme>://:$(LORAROUTE_REDIS_PASSWORD)@<host...>. Kubernetes expands $(VAR) from the
variables defined before it, so the password never appears in a manifest. */}}
{{- define "loraroute.redisUrlWithPassword" -}}
{{- $url := include "loraroute.redisUrl" . -}}
{{- $parts := splitn "://" 2 $url -}}
{{- printf "%s://:$(LORAROUTE_REDIS_PASSWORD)@%s" $parts._0 $parts._1 -}}
{{- end -}}

{{- define "loraroute.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The --model value: KServe mounts storageUri at /mnt/models itself. */}}
{{- define "loraroute.modelArg" -}}
{{- if eq .Values.vllm.mode "kserve" -}}
/mnt/models
{{- else -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.vllm.model.pvc.mountPath) .Values.vllm.model.path -}}
{{- end -}}
{{- end -}}

{{/* The vLLM container's arguments (shared by the Deployment and the ServingRuntime). */}}
{{- define "loraroute.vllmArgs" -}}
- --model={{ include "loraroute.modelArg" . }}
- --served-model-name={{ .Values.vllm.model.servedName }}
- --port={{ .Values.vllm.port }}
- --enable-lora
- --max-loras={{ .Values.vllm.lora.maxLoras }}
- --max-lora-rank={{ .Values.vllm.lora.maxLoraRank }}
- --max-cpu-loras={{ .Values.vllm.lora.maxCpuLoras }}
- --gpu-memory-utilization={{ .Values.vllm.gpuMemoryUtilization }}
{{- if .Values.vllm.maxModelLen }}
- --max-model-len={{ .Values.vllm.maxModelLen }}
{{- end }}
{{- with .Values.precisePrefix }}{{ if .enabled }}
- {{ printf "--kv-events-config=%s" (dict "enable_kv_cache_events" true "publisher" "zmq" "endpoint" (printf "tcp://*:%d" (int .eventsPort)) "replay_endpoint" (printf "tcp://*:%d" (int .replayPort)) "topic" .topic | toJson) | quote }}
{{- end }}{{ end }}
{{- range .Values.vllm.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* The sidecar's kv_events settings (precise prefix routing): vLLM's sockets in the same pod. */}}
{{- define "loraroute.sidecarKVEvents" -}}
{{- $p := .Values.precisePrefix -}}
{{- toJson (dict "endpoint" (printf "tcp://127.0.0.1:%d" (int $p.eventsPort)) "replay_endpoint" (printf "tcp://127.0.0.1:%d" (int $p.replayPort)) "topic" $p.topic) -}}
{{- end -}}

{{/* The vLLM container's environment. */}}
{{- define "loraroute.vllmEnv" -}}
- name: VLLM_ALLOW_RUNTIME_LORA_UPDATING
  value: "true"
- name: VLLM_LORA_RESOLVER_CACHE_DIR
  value: {{ .Values.sidecar.adapterDir | quote }}
- name: HF_HUB_OFFLINE
  value: "1"
- name: VLLM_NO_USAGE_STATS
  value: "1"
{{- with .Values.vllm.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The vLLM container (name given by the caller). */}}
{{- define "loraroute.vllmContainer" -}}
{{- $ctx := index . 0 -}}
- name: {{ index . 1 }}
  image: {{ include "loraroute.image" (list $ctx $ctx.Values.vllm.image) }}
  imagePullPolicy: {{ $ctx.Values.vllm.image.pullPolicy }}
  args:
{{ include "loraroute.vllmArgs" $ctx | indent 4 }}
  env:
{{ include "loraroute.vllmEnv" $ctx | indent 4 }}
  ports:
    - name: http
      containerPort: {{ $ctx.Values.vllm.port }}
      protocol: TCP
  resources:
{{ toYaml $ctx.Values.vllm.resources | indent 4 }}
  startupProbe:
    httpGet: {path: /health, port: http}
{{ toYaml $ctx.Values.vllm.probes.startup | indent 4 }}
  readinessProbe:
    httpGet: {path: /health, port: http}
{{ toYaml $ctx.Values.vllm.probes.readiness | indent 4 }}
  livenessProbe:
    httpGet: {path: /health, port: http}
{{ toYaml $ctx.Values.vllm.probes.liveness | indent 4 }}
  volumeMounts:
    {{- if ne $ctx.Values.vllm.mode "kserve" }}
    - name: model
      mountPath: {{ $ctx.Values.vllm.model.pvc.mountPath }}
      readOnly: true
    {{- end }}
    - name: adapters
      mountPath: {{ $ctx.Values.sidecar.adapterDir }}
    - name: shm
      mountPath: /dev/shm
{{- end -}}

{{/* CA bundle file path inside the sidecar, or "" */}}
{{- define "loraroute.caFile" -}}
{{- if .Values.sidecar.caBundle.enabled -}}
{{- printf "%s/%s" (trimSuffix "/" .Values.sidecar.caBundle.mountPath) .Values.sidecar.caBundle.key -}}
{{- end -}}
{{- end -}}

{{/* The sidecar container. */}}
{{- define "loraroute.sidecarContainer" -}}
{{- $ca := include "loraroute.caFile" . -}}
- name: sidecar
  image: {{ include "loraroute.image" (list . .Values.image) }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  command: [loraroute]
  args:
    - sidecar
    - --config=/etc/loraroute/sidecar.yaml
    - --pod-id=$(POD_NAME)
    - --vllm-url=http://127.0.0.1:{{ .Values.vllm.port }}
    - --advertise-url=http://$(POD_IP):{{ .Values.vllm.port }}
    - --sidecar-url=http://$(POD_IP):{{ .Values.sidecar.port }}
  env:
    - name: POD_NAME
      valueFrom: {fieldRef: {fieldPath: metadata.name}}
    - name: POD_IP
      valueFrom: {fieldRef: {fieldPath: status.podIP}}
    - name: AWS_ACCESS_KEY_ID
      valueFrom:
        secretKeyRef: {name: {{ .Values.sidecar.s3.existingSecret }}, key: {{ .Values.sidecar.s3.accessKeyIdKey }}}
    - name: AWS_SECRET_ACCESS_KEY
      valueFrom:
        secretKeyRef: {name: {{ .Values.sidecar.s3.existingSecret }}, key: {{ .Values.sidecar.s3.secretAccessKeyKey }}}
{{- if .Values.sidecar.s3.fromDataConnection }}
    # endpoint, bucket and region from the data connection (environment overrides the settings file)
    - name: LORAROUTE_SIDECAR_SOURCE__S3__ENDPOINT_URL
      valueFrom:
        secretKeyRef: {name: {{ .Values.sidecar.s3.existingSecret }}, key: AWS_S3_ENDPOINT}
    - name: LORAROUTE_SIDECAR_SOURCE__S3__BUCKET
      valueFrom:
        secretKeyRef: {name: {{ .Values.sidecar.s3.existingSecret }}, key: AWS_S3_BUCKET}
    - name: LORAROUTE_SIDECAR_SOURCE__S3__REGION
      valueFrom:
        secretKeyRef: {name: {{ .Values.sidecar.s3.existingSecret }}, key: AWS_DEFAULT_REGION, optional: true}
{{- end }}
    {{- include "loraroute.redisPasswordEnv" . | nindent 4 }}
    {{- include "loraroute.sidecarTokenEnv" . | nindent 4 }}
{{- if $ca }}
    - name: SSL_CERT_FILE
      value: {{ $ca | quote }}
    - name: REQUESTS_CA_BUNDLE
      value: {{ $ca | quote }}
    - name: AWS_CA_BUNDLE
      value: {{ $ca | quote }}
{{- end }}
{{- with .Values.sidecar.extraEnv }}
{{ toYaml . | indent 4 }}
{{- end }}
  ports:
    - name: sidecar
      containerPort: {{ .Values.sidecar.port }}
      protocol: TCP
  readinessProbe:
    httpGet: {path: /healthz, port: sidecar}
    periodSeconds: 5
  livenessProbe:
    httpGet: {path: /healthz, port: sidecar}
    periodSeconds: 15
    failureThreshold: 4
  resources:
{{ toYaml .Values.sidecar.resources | indent 4 }}
  securityContext:
    allowPrivilegeEscalation: false
    capabilities: {drop: [ALL]}
  volumeMounts:
    - name: adapters
      mountPath: {{ .Values.sidecar.adapterDir }}
    - name: sidecar-config
      mountPath: /etc/loraroute
      readOnly: true
{{- if $ca }}
    - name: ca-bundle
      mountPath: {{ .Values.sidecar.caBundle.mountPath }}
      readOnly: true
{{- end }}
{{- end -}}

{{/* Volumes of a vLLM pod (model PVC, adapter emptyDir, shm, sidecar config, CA bundle). */}}
{{- define "loraroute.vllmVolumes" -}}
{{- $withModel := index . 1 -}}
{{- $ctx := index . 0 -}}
{{- if $withModel }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $ctx.Values.vllm.model.pvc.claimName }}
    readOnly: true
{{- end }}
- name: adapters
  emptyDir:
    sizeLimit: {{ $ctx.Values.sidecar.adapterDirSizeLimit }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ $ctx.Values.vllm.shmSize }}
- name: sidecar-config
  configMap:
    name: {{ include "loraroute.fullname" $ctx }}-sidecar
{{- if $ctx.Values.sidecar.caBundle.enabled }}
- name: ca-bundle
{{- if $ctx.Values.sidecar.caBundle.configMapName }}
  configMap:
    name: {{ $ctx.Values.sidecar.caBundle.configMapName }}
    items: [{key: {{ $ctx.Values.sidecar.caBundle.key }}, path: {{ $ctx.Values.sidecar.caBundle.key }}}]
{{- else }}
  secret:
    secretName: {{ required "sidecar.caBundle: set configMapName or secretName" $ctx.Values.sidecar.caBundle.secretName }}
    items: [{key: {{ $ctx.Values.sidecar.caBundle.key }}, path: {{ $ctx.Values.sidecar.caBundle.key }}}]
{{- end }}
{{- end }}
{{- end -}}

{{/* The sidecars' control token: the Secret holding it (name key), when it is required. */}}
{{- define "loraroute.sidecarTokenSecret" -}}
{{- if .Values.sidecar.controlToken.enabled -}}
{{- printf "%s %s" (default (printf "%s-sidecar-token" (include "loraroute.fullname" .)) .Values.sidecar.controlToken.existingSecret) .Values.sidecar.controlToken.key -}}
{{- end -}}
{{- end -}}

{{/* LORAROUTE_CONTROL_TOKEN from that Secret (the gateway's and the sidecar's containers; not
     LORAROUTE_SIDECAR_*: the sidecar reads that prefix as its own settings). */}}
{{- define "loraroute.sidecarTokenEnv" -}}
{{- $s := include "loraroute.sidecarTokenSecret" . -}}
{{- if $s -}}
{{- $parts := splitList " " $s -}}
- name: LORAROUTE_CONTROL_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ index $parts 0 }}
      key: {{ index $parts 1 }}
{{- end -}}
{{- end -}}
