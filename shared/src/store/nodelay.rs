//! TCP_NODELAY for Postgres connections.
//!
//! sqlx 0.9.0 opens its TCP sockets without `TCP_NODELAY` (an upstream regression,
//! transact-rs/sqlx#4335). Any statement larger than one segment then waits for the server's
//! delayed ACK: ~40 ms per query, which capped ledger appends at a few thousand events per
//! second. sqlx exposes no socket, so right after each connection is made this finds the
//! process's TCP sockets whose peer is the database port and sets the option on them (a no-op
//! for sockets that already have it). Remove once sqlx sets it again.

/// Set `TCP_NODELAY` on every TCP socket of this process connected to `port`.
#[cfg(target_os = "linux")]
pub fn to_port(port: u16) {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in dir.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|s| s.parse::<libc::c_int>().ok()) else {
            continue;
        };
        // SAFETY: plain syscalls on a descriptor number with correctly sized, initialised
        // buffers. A descriptor closed or reused meanwhile makes them fail or apply to a socket
        // that is checked to be a TCP stream to the same port; nothing is dereferenced unless
        // the kernel filled it.
        unsafe {
            let mut addr: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            if libc::getpeername(fd, (&mut addr as *mut libc::sockaddr_storage).cast(), &mut len) != 0 {
                continue;
            }
            let peer_port = match addr.ss_family as libc::c_int {
                libc::AF_INET => {
                    let a = &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>();
                    u16::from_be(a.sin_port)
                }
                libc::AF_INET6 => {
                    let a = &*(&addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>();
                    u16::from_be(a.sin6_port)
                }
                _ => continue,
            };
            if peer_port != port {
                continue;
            }
            let mut ty: libc::c_int = 0;
            let mut tlen = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            if libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&mut ty as *mut libc::c_int).cast(),
                &mut tlen,
            ) != 0
                || ty != libc::SOCK_STREAM
            {
                continue;
            }
            let one: libc::c_int = 1;
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
}

#[cfg(not(target_os = "linux"))]
pub fn to_port(_port: u16) {}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    #[test]
    fn sets_nodelay_on_sockets_to_the_port() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let c2 = std::net::TcpStream::connect(other.local_addr().unwrap()).unwrap();
        assert!(!c.nodelay().unwrap());
        super::to_port(port);
        assert!(c.nodelay().unwrap(), "the socket to the port has TCP_NODELAY");
        assert!(!c2.nodelay().unwrap(), "other sockets are left alone");
    }
}
