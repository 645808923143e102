{{/*
Chart name, truncated to 63 characters (DNS label limit).
*/}}
{{- define "qwenasr.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Fully qualified app name: <release>-<chart>, or the release name alone when it already contains the
chart name. Truncated to 63 characters.
*/}}
{{- define "qwenasr.fullname" -}}
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

{{- define "qwenasr.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels on every object.
*/}}
{{- define "qwenasr.labels" -}}
helm.sh/chart: {{ include "qwenasr.chart" . }}
{{ include "qwenasr.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: qwenasr-appliance
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels: stable for the life of a release (Deployment selectors are immutable).
*/}}
{{- define "qwenasr.selectorLabels" -}}
app.kubernetes.io/name: {{ include "qwenasr.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: server
{{- end }}

{{- define "qwenasr.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "qwenasr.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
Image reference: repository@digest, else repository:tag (tag defaults to the appVersion).
*/}}
{{- define "qwenasr.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The Secret holding the API keys, or "" when authentication is off.
*/}}
{{- define "qwenasr.apiKeysSecretName" -}}
{{- if .Values.apiKeys.existingSecret }}
{{- .Values.apiKeys.existingSecret }}
{{- else if .Values.apiKeys.keys }}
{{- printf "%s-api-keys" (include "qwenasr.fullname" .) }}
{{- end }}
{{- end }}

{{- define "qwenasr.apiKeysSecretKey" -}}
{{- if .Values.apiKeys.existingSecret }}{{ .Values.apiKeys.existingSecretKey }}{{ else }}api-keys{{ end }}
{{- end }}

{{- define "qwenasr.modelClaimName" -}}
{{- default (printf "%s-models" (include "qwenasr.fullname" .)) .Values.modelCache.existingClaim }}
{{- end }}

{{/*
SHUTDOWN_GRACE_SECONDS: explicit, or queue timeout + request timeout (capped at 3600 s) so that every
admitted request can finish during a drain.
*/}}
{{- define "qwenasr.shutdownGraceSeconds" -}}
{{- if kindIs "invalid" .Values.config.shutdownGraceSeconds }}
{{- minf 3600 (addf .Values.config.queueTimeoutSeconds .Values.config.requestTimeoutSeconds) }}
{{- else }}
{{- .Values.config.shutdownGraceSeconds }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: explicit, or preStop sleep + drain + 15 s for the engine to stop.
*/}}
{{- define "qwenasr.terminationGracePeriodSeconds" -}}
{{- $drain := add (int .Values.preStopSleepSeconds) (int (ceil (include "qwenasr.shutdownGraceSeconds" . | float64))) }}
{{- if .Values.terminationGracePeriodSeconds }}
{{- if le (int .Values.terminationGracePeriodSeconds) (int $drain) }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must exceed preStopSleepSeconds + config.shutdownGraceSeconds (%d): the pod would be killed mid-drain" (int .Values.terminationGracePeriodSeconds) (int $drain)) }}
{{- end }}
{{- int .Values.terminationGracePeriodSeconds }}
{{- else }}
{{- add $drain 15 }}
{{- end }}
{{- end }}

{{/*
Startup budget of a new pod in seconds: startup probe delay + period x failureThreshold.
*/}}
{{- define "qwenasr.startupBudgetSeconds" -}}
{{- $p := .Values.probes.startup }}
{{- if $p.enabled }}
{{- add (int $p.initialDelaySeconds) (mul (int $p.periodSeconds) (int $p.failureThreshold)) }}
{{- else }}
{{- 0 }}
{{- end }}
{{- end }}

{{/*
Deployment progressDeadlineSeconds: explicit (at least the startup budget), or the startup budget +
progressDeadlineMarginSeconds, so that a first start never fails `kubectl rollout status`.
*/}}
{{- define "qwenasr.progressDeadlineSeconds" -}}
{{- $budget := int (include "qwenasr.startupBudgetSeconds" .) }}
{{- if .Values.progressDeadlineSeconds }}
{{- if le (int .Values.progressDeadlineSeconds) $budget }}
{{- fail (printf "progressDeadlineSeconds (%d) must exceed the startup budget (%d s = probes.startup initialDelaySeconds + periodSeconds x failureThreshold): a first start (download + compile) would fail the rollout" (int .Values.progressDeadlineSeconds) $budget) }}
{{- end }}
{{- int .Values.progressDeadlineSeconds }}
{{- else }}
{{- add $budget (int .Values.progressDeadlineMarginSeconds) }}
{{- end }}
{{- end }}

{{/*
"true" when /cache lives on the model volume (subPath), "" when it is an emptyDir.
*/}}
{{- define "qwenasr.cacheOnModelVolume" -}}
{{- $mode := .Values.cache.volume }}
{{- if eq $mode "modelVolume" }}
{{- if .Values.modelCache.readOnly }}
{{- fail "cache.volume is modelVolume but modelCache.readOnly is true: the caches need a writable volume (use cache.volume: emptyDir or auto)" }}
{{- end }}
{{- true }}
{{- else if and (eq $mode "auto") .Values.modelCache.enabled (not .Values.modelCache.readOnly) }}
{{- true }}
{{- end }}
{{- end }}

{{/*
Admission limit of one replica from the values, for KEDA's default query when the pods export no
qwenasr_concurrency_limit gauge (images before it): config.maxConcurrentRequests, else the engine's.
*/}}
{{- define "qwenasr.capacityPerReplica" -}}
{{- if .Values.keda.capacityPerReplica }}
{{- int .Values.keda.capacityPerReplica }}
{{- else if .Values.config.maxConcurrentRequests }}
{{- int .Values.config.maxConcurrentRequests }}
{{- else if eq .Values.config.engine "cpu" }}
{{- 1 }}
{{- else }}
{{- int .Values.config.maxNumSeqs }}
{{- end }}
{{- end }}

{{/*
PromQL matchers of this release's series: the namespace and the target label the chart's
ServiceMonitor/PodMonitor add from the pods' app.kubernetes.io/instance label (podTargetLabels). Exact
labels, not a pod-name pattern: generated pod names are cut to 58 characters (a long release loses the
dashes a pattern needs) and `<fullname>-...` also matches a sibling release named `<fullname>-eu`.
*/}}
{{- define "qwenasr.releaseTargetLabel" -}}
app_kubernetes_io_instance
{{- end }}

{{- define "qwenasr.releaseMatchers" -}}
{{- printf "namespace=\"%s\", %s=\"%s\"" .Release.Namespace (include "qwenasr.releaseTargetLabel" .) .Release.Name }}
{{- end }}

{{/*
CLIENT_TIMEOUT_SECONDS: config.clientTimeoutSeconds, raised with an Ingress to at least the
controller's idle upstream keep-alive (ingress.upstreamKeepaliveTimeoutSeconds) + 5 s. The app closes
idle keep-alive connections after it (granian's header read timeout); below nginx's, nginx reuses a
socket the app has just closed and a POST fails with 502.
*/}}
{{- define "qwenasr.clientTimeoutSeconds" -}}
{{- $timeout := float64 .Values.config.clientTimeoutSeconds }}
{{- $keepalive := int .Values.ingress.upstreamKeepaliveTimeoutSeconds }}
{{- if and .Values.ingress.enabled (gt $keepalive 0) }}
{{- $timeout = maxf $timeout (add $keepalive 5) }}
{{- end }}
{{- $timeout }}
{{- end }}

{{/*
Plain number for an env value: integers without exponent (YAML numbers arrive as float64).
*/}}
{{- define "qwenasr.number" -}}
{{- if eq (float64 .) (float64 (int64 .)) }}{{ int64 . }}{{ else }}{{ float64 . }}{{ end }}
{{- end }}

{{/*
The appliance's environment, one variable per `config` key (names from config.py).
*/}}
{{- define "qwenasr.configEnv" -}}
{{- $c := .Values.config }}
{{- /* GPU_FALLBACK "" = not_ready when the pod gets a GPU: a pod that lost it leaves the Service
       instead of serving on the CPU as ready with room for one request (queue and autoscaler blow up). */}}
{{- $gpuFallback := $c.gpuFallback | default (ternary "not_ready" "degraded" .Values.gpu.enabled) }}
{{- $text := dict "GPU_FALLBACK" $gpuFallback "MODEL_ID" $c.modelId "SERVED_MODEL_NAME" $c.servedModelName "ENGINE" $c.engine "DTYPE" $c.dtype "QUANT_MODE" $c.quantMode "LOAD_FORMAT" $c.loadFormat "LOG_LEVEL" $c.logLevel "LOG_FORMAT" $c.logFormat "ALIGNER_MODEL_ID" $c.alignerModelId }}
{{- $bool := dict "ENFORCE_EAGER" $c.enforceEager "PROTECT_OPS_ENDPOINTS" $c.protectOpsEndpoints "HTTP2" $c.http2 "VERBOSE_JSON_CONFIDENCE" $c.verboseJsonConfidence "EXPECT_GPU" .Values.gpu.enabled "LIVE_PAGE" $c.livePage }}
{{- $num := dict "GPU_MEMORY_UTILIZATION" $c.gpuMemoryUtilization "MAX_MODEL_LEN" $c.maxModelLen "MAX_NUM_SEQS" $c.maxNumSeqs "MAX_NEW_TOKENS" $c.maxNewTokens "CHUNK_SECONDS" $c.chunkSeconds "MAX_UPLOAD_BYTES" $c.maxUploadBytes "UPLOAD_BUFFER_BYTES" $c.uploadBufferBytes "MAX_AUDIO_SECONDS" $c.maxAudioSeconds "MAX_CONCURRENT_REQUESTS" $c.maxConcurrentRequests "MAX_QUEUE_SIZE" $c.maxQueueSize "QUEUE_TIMEOUT_SECONDS" $c.queueTimeoutSeconds "REQUEST_TIMEOUT_SECONDS" $c.requestTimeoutSeconds "WORKER_TIMEOUT_SECONDS" $c.workerTimeoutSeconds "MAX_PROMPT_CHARS" $c.maxPromptChars "DECODE_WORKERS" $c.decodeWorkers "CPU_THREADS" $c.cpuThreads "SHUTDOWN_GRACE_SECONDS" (include "qwenasr.shutdownGraceSeconds" . | float64) "CLIENT_TIMEOUT_SECONDS" (include "qwenasr.clientTimeoutSeconds" . | float64) "ENGINE_RESTART_MAX" $c.engineRestartMax "ENGINE_RESTART_BACKOFF_SECONDS" $c.engineRestartBackoffSeconds "ALIGNER_GPU_MEMORY_UTILIZATION" $c.alignerGpuMemoryUtilization }}
{{- $live := dict "LIVE_MAX_SESSIONS" $c.liveMaxSessions "LIVE_MAX_SESSION_SECONDS" $c.liveMaxSessionSeconds "LIVE_IDLE_TIMEOUT_SECONDS" $c.liveIdleTimeoutSeconds "LIVE_MAX_APPEND_BYTES" $c.liveMaxAppendBytes "LIVE_MAX_TURN_SECONDS" $c.liveMaxTurnSeconds "LIVE_PARTIAL_INTERVAL_SECONDS" $c.livePartialIntervalSeconds "LIVE_SEND_QUEUE_EVENTS" $c.liveSendQueueEvents "LIVE_SEND_TIMEOUT_SECONDS" $c.liveSendTimeoutSeconds }}
{{- $num = merge $num $live }}
{{- range $name, $value := $text }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- range $name, $value := $bool }}
- name: {{ $name }}
  value: {{ ternary "true" "false" $value | quote }}
{{- end }}
{{- range $name, $value := $num }}
- name: {{ $name }}
  value: {{ include "qwenasr.number" $value | quote }}
{{- end }}
{{- end }}

{{/*
Consistency checks that JSON schema cannot express.
*/}}
{{- define "qwenasr.validate" -}}
{{- if and .Values.autoscaling.enabled .Values.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled are alternatives: KEDA creates its own HPA. Enable one of them." }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled }}
{{- fail "metrics.serviceMonitor.enabled and metrics.podMonitor.enabled would scrape every pod twice (dashboard totals, alerts and KEDA's load doubled): enable one of them" }}
{{- end }}
{{- if .Values.config.protectOpsEndpoints }}
{{- $probeAuth := false }}
{{- range .Values.probes.httpHeaders }}
{{- if eq (lower .name) "authorization" }}{{ $probeAuth = true }}{{ end }}
{{- end }}
{{- $probed := or .Values.probes.startup.enabled .Values.probes.readiness.enabled .Values.probes.liveness.enabled }}
{{- if and $probed (not $probeAuth) }}
{{- fail "config.protectOpsEndpoints puts /health and /ready behind the API keys: the probes would get 401, the startup probe would fail after its budget and the pod restart forever. Either add an Authorization header to the probes (probes.httpHeaders: [{name: Authorization, value: 'Bearer <one of the API keys>'}]; the value is plain text in the pod spec, so use a key kept for probes), or keep config.protectOpsEndpoints false and keep /metrics and /status private with networkPolicy (allowExternal: false) instead" }}
{{- end }}
{{- range $kind := list "serviceMonitor" "podMonitor" }}
{{- $monitor := index $.Values.metrics $kind }}
{{- if and $monitor.enabled (not $monitor.authorization) }}
{{- fail (printf "config.protectOpsEndpoints puts /metrics behind the API keys but metrics.%s.authorization is empty: every scrape would get 401 (no dashboards, QwenASRDown firing, KEDA without data). Set it, e.g. {type: Bearer, credentials: {name: <Secret>, key: <key holding an API key>}}" $kind) }}
{{- end }}
{{- end }}
{{- end }}
{{- /* extraEnv must not repeat a variable the chart sets: two entries of one name, the later silently
       winning over the value the chart derived (and checked). Each name maps to the value to set. */}}
{{- $fixed := dict "HOST" "0.0.0.0 (every address of the pod): use networkPolicy instead to limit who reaches it" "PORT" "8001 (the container port the probes, Service and monitors target): use service.port instead for the Service's port" }}
{{- $owners := dict "HF_HOME" "modelCache.mountPath" "HF_TOKEN" "huggingface.token.existingSecret" "HF_HUB_OFFLINE" "huggingface.offline" "API_KEYS" "apiKeys.existingSecret" "EXPECT_GPU" "gpu.enabled" }}
{{- range (include "qwenasr.configEnv" . | fromYamlArray) }}
{{- if not (hasKey $owners .name) }}
{{- $_ := set $owners .name (printf "config.%s" (.name | lower | camelcase | untitle)) }}
{{- end }}
{{- end }}
{{- range .Values.extraEnv }}
{{- $name := .name }}
{{- with get $fixed $name }}
{{- fail (printf "extraEnv sets %s, which the chart fixes at %s" $name .) }}
{{- end }}
{{- with get $owners $name }}
{{- fail (printf "extraEnv sets %s, which the chart sets from %s: use %s instead (a second env entry of the same name would silently override the chart's)" $name . .) }}
{{- end }}
{{- end }}
{{- /* An existing claim shared by every replica: the chart cannot see its access mode, the user declares it. */}}
{{- if and (or .Values.autoscaling.enabled .Values.keda.enabled) .Values.modelCache.enabled .Values.modelCache.existingClaim (not (has .Values.modelCache.existingClaimAccessMode (list "ReadWriteMany" "ReadOnlyMany"))) }}
{{- fail (printf "autoscaling/KEDA with modelCache.existingClaim %q shared by every replica, declared %s (modelCache.existingClaimAccessMode): pods that land on other nodes cannot mount it and stay ContainerCreating. If the claim is ReadWriteMany or ReadOnlyMany, say so in modelCache.existingClaimAccessMode; otherwise drop existingClaim and use workloadKind: StatefulSet (one volume per replica)" .Values.modelCache.existingClaim .Values.modelCache.existingClaimAccessMode) }}
{{- end }}
{{- if and .Values.keda.enabled (not .Values.keda.prometheus.query) (not (or .Values.metrics.serviceMonitor.enabled .Values.metrics.podMonitor.enabled)) }}
{{- fail "keda.enabled needs metrics.serviceMonitor.enabled or metrics.podMonitor.enabled: KEDA's default query reads the load of this release's series, which only a ServiceMonitor or a PodMonitor of this chart labels (app_kubernetes_io_instance). Without them there is no data, and KEDA would sit in its fallback. Enable one, or set keda.prometheus.query to your own query" }}
{{- end }}
{{- if and .Values.keda.enabled (lt (int .Values.keda.minReplicaCount) 1) }}
{{- fail "keda.minReplicaCount must be at least 1: the scaling metric comes from the appliance's own pods, so with zero pods nothing reports load and KEDA could never scale back up" }}
{{- end }}
{{- $sharedClaim := and .Values.modelCache.enabled (not .Values.modelCache.existingClaim) (eq .Values.workloadKind "Deployment") }}
{{- if and (or .Values.autoscaling.enabled .Values.keda.enabled) $sharedClaim (or (has "ReadWriteOnce" .Values.modelCache.accessModes) (has "ReadWriteOncePod" .Values.modelCache.accessModes)) }}
{{- fail "autoscaling/KEDA with one ReadWriteOnce model volume shared by every replica: pods scheduled on other nodes cannot mount it and stay ContainerCreating. Use workloadKind: StatefulSet (one volume per replica), modelCache.accessModes: [ReadWriteMany], or a pre-filled ReadOnlyMany modelCache.existingClaim" }}
{{- end }}
{{- if and (not .Values.gpu.enabled) (eq .Values.config.engine "vllm") }}
{{- fail "config.engine is vllm but gpu.enabled is false: the pod would get no GPU. Use config.engine: cpu (or auto), or enable gpu." }}
{{- end }}
{{- if and .Values.autoscaling.enabled (lt (int .Values.autoscaling.maxReplicas) (int .Values.autoscaling.minReplicas)) }}
{{- fail "autoscaling.maxReplicas must be >= autoscaling.minReplicas" }}
{{- end }}
{{- if and .Values.keda.enabled (lt (int .Values.keda.maxReplicaCount) (int .Values.keda.minReplicaCount)) }}
{{- fail "keda.maxReplicaCount must be >= keda.minReplicaCount" }}
{{- end }}
{{- if and (gt (int .Values.config.maxModelLen) 0) (ge (int .Values.config.maxNewTokens) (int .Values.config.maxModelLen)) }}
{{- fail "config.maxNewTokens must be smaller than config.maxModelLen" }}
{{- end }}
{{- if and .Values.modelCache.prefetch.enabled (hasPrefix "/" .Values.config.modelId) }}
{{- fail "modelCache.prefetch downloads a Hugging Face repo id: config.modelId is a local path, pre-fetch it into the volume yourself" }}
{{- end }}
{{- if and .Values.config.alignerModelId (gt (float64 .Values.config.chunkSeconds) 180.0) }}
{{- fail "config.alignerModelId needs config.chunkSeconds <= 180: the forced aligner takes at most 180 s of audio at once" }}
{{- end }}
{{- if and .Values.modelCache.readOnly .Values.modelCache.prefetch.enabled }}
{{- fail "modelCache.prefetch needs a writable model volume: set modelCache.readOnly to false" }}
{{- end }}
{{- end }}
