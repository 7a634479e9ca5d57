//! containerd's CRI plugin driven the way the kubelet drives it: a CRI v1 client over the
//! private containerd's unix socket ([`Cri::connect`]), the `bridge` + `host-local` CNI
//! network the plugin sets pods up with ([`write_bridge_conflist`]), the pause image
//! ([`pause_image`]) and images imported into the plugin's `k8s.io` namespace
//! ([`import_k8s`]), pod and container configurations, and the CRI log format
//! ([`parse_log`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ImageSpec, KeyValue, LinuxPodSandboxConfig,
    PodSandboxConfig, PodSandboxMetadata,
};
use sha2::{Digest, Sha256};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{run_with_timeout, Containerd, Image};

/// The CRI v1 messages and services (the `k8s-cri` crate's `v1`).
pub use k8s_cri::v1 as api;

/// The containerd namespace the CRI plugin keeps its images, containers and tasks in.
pub const K8S_NAMESPACE: &str = "k8s.io";

/// The CRI runtime and image services of one containerd.
#[derive(Debug, Clone)]
pub struct Cri {
    /// `runtime.v1.RuntimeService`.
    pub runtime: RuntimeServiceClient<Channel>,
    /// `runtime.v1.ImageService`.
    pub images: ImageServiceClient<Channel>,
}

impl Cri {
    /// Connects to containerd's gRPC socket (the CRI services are served there).
    pub async fn connect(socket: &Path) -> Result<Cri> {
        let socket = socket.to_path_buf();
        // The URI is required by the API and ignored: the connector dials the socket.
        let channel = Endpoint::try_from("http://[::]:50051")?
            .connect_timeout(Duration::from_secs(10))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    let stream = tokio::net::UnixStream::connect(&socket).await?;
                    Ok::<_, std::io::Error>(TokioIo::new(stream))
                }
            }))
            .await
            .context("connecting to containerd's CRI socket")?;
        Ok(Cri {
            runtime: RuntimeServiceClient::new(channel.clone()),
            images: ImageServiceClient::new(channel),
        })
    }
}

/// Runs one CRI call on `rt`: its answer, or an error naming `what` when the call fails or
/// takes longer than `limit` (a runtime that hangs fails the test instead of stalling it).
pub fn call<T>(
    rt: &tokio::runtime::Runtime,
    what: &str,
    limit: Duration,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T> {
    // The timer is made inside the runtime.
    match rt.block_on(async { tokio::time::timeout(limit, call).await }) {
        Ok(Ok(answer)) => Ok(answer.into_inner()),
        Ok(Err(status)) => bail!("{what} failed ({:?}): {}", status.code(), status.message()),
        Err(_) => bail!("{what} did not answer within {limit:?}"),
    }
}

/// Writes `DIR/10-NAME.conflist`: a `bridge` network (bridge `BRIDGE`, gateway on it) with
/// `host-local` IPAM on `subnet`, its leases in `data_dir`; what containerd's CRI plugin
/// runs `/usr/lib/cni/bridge` with for every pod.
pub fn write_bridge_conflist(
    dir: &Path,
    name: &str,
    bridge: &str,
    subnet: &str,
    data_dir: &Path,
) -> Result<PathBuf> {
    let conf = serde_json::json!({
        "cniVersion": "0.4.0",
        "name": name,
        "plugins": [{
            "type": "bridge",
            "bridge": bridge,
            "isGateway": true,
            "ipMasq": false,
            "ipam": {
                "type": "host-local",
                "subnet": subnet,
                "routes": [{ "dst": "0.0.0.0/0" }],
                "dataDir": data_dir,
            }
        }]
    });
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!("10-{name}.conflist"));
    std::fs::write(&path, serde_json::to_vec_pretty(&conf)?)
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

/// The pod's pause image: the busybox image whose entrypoint sleeps until it is killed
/// (`sleep infinity`), named `localhost/kata-test/pause:TAG`.
pub fn pause_image(tag: &str) -> Image {
    let mut image = Image::busybox(tag);
    image.name = format!("localhost/kata-test/pause:{tag}");
    image.entrypoint = vec!["/bin/sleep".into()];
    image.cmd = vec!["infinity".into()];
    image
}

/// Imports `image` into the CRI plugin's `k8s.io` namespace (`ctr -n k8s.io image import`),
/// so that the plugin never pulls it.
pub fn import_k8s(containerd: &Containerd, image: &Image) -> Result<()> {
    let tar = containerd
        .dir()
        .join(format!("image-{}.tar", crate::unique_name("cri")));
    image.write_layout_tar(&tar)?;
    let mut cmd = std::process::Command::new("/usr/bin/ctr");
    cmd.arg("--address")
        .arg(containerd.address())
        .args(["--namespace", K8S_NAMESPACE, "image", "import"])
        .arg(&tar);
    let out = run_with_timeout(cmd, None, Duration::from_secs(120));
    std::fs::remove_file(&tar).ok();
    let out = out?;
    ensure!(
        out.status.success(),
        "importing {} into {K8S_NAMESPACE}: {out}",
        image.name
    );
    Ok(())
}

/// The shim socket containerd names for task `id` of the CRI plugin
/// (`/run/containerd/s/<sha256 of ADDRESS/k8s.io/ID>`).
pub fn shim_socket(containerd: &Containerd, id: &str) -> PathBuf {
    let key = format!("{}/{K8S_NAMESPACE}/{id}", containerd.address().display());
    Path::new("/run/containerd/s").join(format!("{:x}", Sha256::digest(key.as_bytes())))
}

/// A pod named `name` (namespace `default`, uid `uid-NAME`) whose container logs go under
/// `log_directory`, in the pod network namespace (the CRI default).
pub fn pod_config(name: &str, log_directory: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.into(),
            uid: format!("uid-{name}"),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.into(),
        log_directory: log_directory.display().to_string(),
        linux: Some(LinuxPodSandboxConfig::default()),
        ..Default::default()
    }
}

/// A container named `name` of `image` running `command`, its log at `NAME.log` in the pod's
/// log directory.
pub fn container_config(name: &str, image: &str, command: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.into(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.into(),
            ..Default::default()
        }),
        command: command.iter().map(|s| s.to_string()).collect(),
        envs: vec![KeyValue {
            key: "CONTAINER_NAME".into(),
            value: name.into(),
        }],
        log_path: format!("{name}.log"),
        ..Default::default()
    }
}

/// One line of a CRI container log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// `stdout` or `stderr`.
    pub stream: String,
    /// The line's text (a partial line, tagged `P`, is joined with what follows).
    pub text: String,
}

/// Parses a CRI log file: `TIMESTAMP STREAM TAG TEXT` per line, `TAG` being `F` (full) or
/// `P` (partial, continued on the next line of the same stream). A line in another form
/// fails this: containerd wrote something that is not a CRI log.
pub fn parse_log(content: &str) -> Result<Vec<LogLine>> {
    let mut lines: Vec<LogLine> = Vec::new();
    let mut partial: Option<LogLine> = None;
    for raw in content.lines() {
        let mut f = raw.splitn(4, ' ');
        let (Some(time), Some(stream), Some(tag)) = (f.next(), f.next(), f.next()) else {
            bail!("not a CRI log line: {raw:?}");
        };
        let text = f.next().unwrap_or_default();
        ensure!(
            time.contains('T') && (stream == "stdout" || stream == "stderr"),
            "not a CRI log line: {raw:?}"
        );
        let line = match partial.take() {
            Some(mut p) if p.stream == stream => {
                p.text.push_str(text);
                p
            }
            Some(p) => bail!(
                "a partial {} line ended by {stream}: {:?}",
                p.stream,
                p.text
            ),
            None => LogLine {
                stream: stream.into(),
                text: text.into(),
            },
        };
        match tag {
            "F" => lines.push(line),
            "P" => partial = Some(line),
            _ => bail!("unknown CRI log tag {tag:?} in {raw:?}"),
        }
    }
    Ok(lines)
}

/// Waits until the CRI log at `path` satisfies `done`, at most `limit`: its lines then.
/// containerd writes the log as the container prints; nothing tells another process of a
/// write, so the file is read every 100 ms.
pub fn wait_log(
    path: &Path,
    limit: Duration,
    done: impl Fn(&[LogLine]) -> bool,
) -> Result<Vec<LogLine>> {
    let began = Instant::now();
    loop {
        let content = std::fs::read_to_string(path).unwrap_or_default();
        let lines = parse_log(&content)?;
        if done(&lines) {
            return Ok(lines);
        }
        if began.elapsed() > limit {
            bail!(
                "{} does not have the expected lines after {limit:?}: {content:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether `lines` has `text` on `stream` (`stdout`, `stderr`).
pub fn has_line(lines: &[LogLine], stream: &str, text: &str) -> bool {
    lines.iter().any(|l| l.stream == stream && l.text == text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cri_log_lines_are_parsed_and_partials_joined() {
        let log = "2024-01-02T03:04:05.000000006Z stdout F hello\n\
                   2024-01-02T03:04:05.1Z stderr P par\n\
                   2024-01-02T03:04:05.2Z stderr F tial\n\
                   2024-01-02T03:04:05.3Z stdout F \n";
        let lines = parse_log(log).unwrap();
        let got: Vec<(&str, &str)> = lines
            .iter()
            .map(|l| (l.stream.as_str(), l.text.as_str()))
            .collect();
        assert_eq!(
            got,
            [("stdout", "hello"), ("stderr", "partial"), ("stdout", "")]
        );
    }

    #[test]
    fn a_log_that_is_not_cri_fails() {
        assert!(parse_log("hello\n").is_err());
        assert!(parse_log("2024-01-02T03:04:05Z stdin F x\n").is_err());
        assert!(parse_log("2024-01-02T03:04:05Z stdout X x\n").is_err());
        assert!(
            parse_log("2024-01-02T03:04:05Z stdout P a\n2024-01-02T03:04:05Z stderr F b\n")
                .is_err()
        );
    }
}
