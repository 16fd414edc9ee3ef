//! A real node (scripts/node.sh: kubelet, containerd, runc, CNI bridge, CoreDNS) beside the
//! local control plane: two pods of a headless Service, as the operator makes for a 2-node gang
//! (pod hostname + subdomain), get their own IPs, find each other by the Service's DNS names,
//! talk TCP, and `kubectl logs`/`exec` reach them through the kubelet's authenticated API;
//! `down` leaves no bridge, cgroup, mount or process.
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use dinoflow_e2e::{REAL_NODE_NAME, RealNode, TestCluster, processes_mentioning, wait_for};

const SERVICE: &str = "gang";
const PORT: u16 = 7000;

fn pods_manifest(ns: &str, image: &str) -> String {
    let pod = |name: &str, script: &str| {
        format!(
            r#"---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {SERVICE}}}}}
spec:
  hostname: {name}
  subdomain: {SERVICE}
  restartPolicy: Never
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: {image}
    imagePullPolicy: Never
    command: ["/bin/sh", "-c", {script:?}]
    securityContext: {{runAsNonRoot: true, runAsUser: 1000, allowPrivilegeEscalation: false, capabilities: {{drop: [ALL]}}}}
"#
        )
    };
    // gang-0 serves one TCP connection and prints what it got; gang-1 waits until DNS has
    // gang-0's name, then sends to the address DNS gave (busybox's nc resolves names through
    // static glibc, which segfaults; busybox's nslookup has its own resolver).
    let fqdn = format!("gang-0.{SERVICE}.{ns}.svc.cluster.local");
    let server = format!("echo listening; nc -l -p {PORT}; echo done; sleep 3600");
    let client = format!(
        "until ip=$(nslookup {fqdn} | awk '/^Name:/ {{n=1}} n && /^Address/ {{print $NF; exit}}') && [ -n \"$ip\" ]; do sleep 0.2; done; \
         echo \"gang-0 is $ip\"; echo hello-from-gang-1 | nc \"$ip\" {PORT}; echo sent; sleep 3600"
    );
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {SERVICE}, namespace: {ns}}}
spec:
  clusterIP: None
  publishNotReadyAddresses: true
  selector: {{app: {SERVICE}}}
  ports: [{{name: ring, port: {PORT}}}]
{}{}"#,
        pod("gang-0", &server),
        pod("gang-1", &client)
    )
}

fn kubectl(cluster: &TestCluster, args: &[&str]) -> String {
    cluster.kubectl(args).unwrap().ok().unwrap()
}

#[test]
fn two_gang_pods_on_a_real_node_resolve_each_other_by_dns_and_talk_tcp() {
    let test_start = Instant::now();
    let cluster = TestCluster::start_fresh().expect("control plane up");
    let started = Instant::now();
    let node = RealNode::start(&cluster, &["dinoflow.dev/e2e-node=real"]).expect("node up");
    eprintln!("node Ready in {:.1?}", started.elapsed());
    let node_dir = node.dir();
    let bridge = node.env("BRIDGE").expect("node.env has BRIDGE").to_owned();
    let cgroup_root = node.env("CGROUP_ROOT").expect("CGROUP_ROOT").to_owned();
    let subnet = node.env("SUBNET").expect("SUBNET").to_owned();
    let prefix = subnet.trim_end_matches("0/24").to_owned();

    let version = kubectl(
        &cluster,
        &[
            "get",
            "node",
            REAL_NODE_NAME,
            "-o",
            "jsonpath={.status.nodeInfo.kubeletVersion} {.status.nodeInfo.containerRuntimeVersion}",
        ],
    );
    assert!(
        version.starts_with("v1.37.2 containerd://"),
        "node reports {version}"
    );

    let (archive, image) = RealNode::busybox_image().expect("busybox test image");
    node.import(&archive).expect("image import");

    let ns = cluster.create_namespace("real-node").unwrap();
    let applied = Instant::now();
    let manifest = pods_manifest(&ns, &image);
    let file = node_dir.join("gang.yaml");
    std::fs::write(&file, manifest).unwrap();
    kubectl(&cluster, &["apply", "-f", file.to_str().unwrap()]);

    let ips = wait_for(Duration::from_secs(90), || {
        let out = kubectl(
            &cluster,
            &[
                "get", "pods", "-n", &ns, "-o",
                r#"jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.status.podIP}{"\n"}{end}"#,
            ],
        );
        let pods: Vec<Vec<&str>> = out.lines().map(|l| l.split(' ').collect()).collect();
        (pods.len() == 2 && pods.iter().all(|p| p.len() == 3 && p[1] == "Running" && !p[2].is_empty()))
            .then(|| pods.iter().map(|p| p[2].to_owned()).collect::<Vec<_>>())
    })
    .unwrap_or_else(|| {
        panic!(
            "pods not Running with IPs within 90 s:\n{}",
            kubectl(&cluster, &["describe", "pods", "-n", &ns])
        )
    });
    eprintln!("both pods Running after {:.1?}: {ips:?}", applied.elapsed());
    assert_ne!(ips[0], ips[1], "each pod has its own IP");
    for ip in &ips {
        assert!(
            ip.starts_with(&prefix),
            "{ip} is not in the node's {subnet}"
        );
    }

    // The client found gang-0 through CoreDNS and sent; the server printed it: `kubectl logs`
    // goes through the kubelet's API with the API server's client certificate.
    let logs = wait_for(Duration::from_secs(60), || {
        let server = kubectl(&cluster, &["logs", "-n", &ns, "gang-0"]);
        server.contains("done").then_some(server)
    })
    .unwrap_or_else(|| {
        panic!(
            "gang-0 got nothing; gang-1 says:\n{}",
            kubectl(&cluster, &["logs", "-n", &ns, "gang-1"])
        )
    });
    assert!(logs.contains("hello-from-gang-1"), "gang-0 logs: {logs}");
    let client = kubectl(&cluster, &["logs", "-n", &ns, "gang-1"]);
    assert!(
        client.contains(&format!("gang-0 is {}", ips[0])) && client.contains("sent"),
        "gang-1 logs: {client}"
    );

    // `kubectl exec`: the Service's name resolves to both pods, the short name through the
    // pod's search path, and the resolver is the node's CoreDNS.
    let exec = |cmd: &str| {
        kubectl(
            &cluster,
            &["exec", "-n", &ns, "gang-1", "--", "sh", "-c", cmd],
        )
    };
    let service = exec(&format!("nslookup {SERVICE}.{ns}.svc.cluster.local"));
    for ip in &ips {
        assert!(
            service.contains(ip.as_str()),
            "{SERVICE} resolves to {service}"
        );
    }
    let resolv = exec("cat /etc/resolv.conf");
    assert!(
        resolv.contains(&format!("nameserver {}", node.env("DNS_IP").unwrap()))
            && resolv.contains(&format!("search {ns}.svc.cluster.local")),
        "resolv.conf: {resolv}"
    );
    let hostname = exec("hostname");
    assert_eq!(hostname.trim(), "gang-1");
    // No default route: traffic stays on this machine.
    let routes = exec("ip route");
    assert!(!routes.contains("default"), "pod routes: {routes}");

    // logs and exec went through the kubelet's API with the API server's certificate; an
    // anonymous caller is refused.
    let port = node.env("KUBELET_PORT").expect("KUBELET_PORT");
    let anonymous = Command::new("curl")
        .args(["-sk", "-o", "/dev/null", "-w", "%{http_code}"])
        .arg(format!("https://127.0.0.1:{port}/pods"))
        .output()
        .expect("curl runs");
    assert_eq!(String::from_utf8_lossy(&anonymous.stdout), "401");

    kubectl(&cluster, &["delete", "namespace", &ns, "--wait=false"]);
    node.stop().expect("node down");
    assert!(
        !Path::new("/sys/class/net").join(&bridge).exists(),
        "bridge {bridge} left behind"
    );
    assert!(
        !Path::new("/sys/fs/cgroup/memory")
            .join(cgroup_root.trim_start_matches('/'))
            .exists(),
        "cgroup {cgroup_root} left behind"
    );
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(node_dir.to_str().unwrap()),
        "mounts left under {}",
        node_dir.display()
    );
    assert!(!node_dir.exists(), "{} left behind", node_dir.display());
    assert_eq!(
        processes_mentioning(&node_dir),
        Vec::<u32>::new(),
        "node processes left"
    );
    eprintln!("test took {:.1?}", test_start.elapsed());
}
