"""SSRF policy for webhook subscriber URLs: which URLs and addresses events may be sent to.

`check_url` is a syntax-only check (no DNS) suitable for configuration time;
`check_ip` decides whether one address is an acceptable destination; `resolve_and_check`
resolves the host and checks every address it resolves to (a DNS-rebinding guard: the
caller must then connect to one of the returned addresses, not resolve the name again).

Without `allow_private`, loopback, private, link-local (including the cloud metadata
address 169.254.169.254), CGNAT, reserved and other non-global addresses are refused, as
are their IPv4-mapped IPv6 forms. Unspecified (0.0.0.0/8, ::), multicast and broadcast
addresses are refused always.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from urllib.parse import urlsplit

__all__ = ["UrlRefused", "check_url", "check_ip", "resolve_and_check", "MAX_URL_LENGTH"]

MAX_URL_LENGTH = 2048

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_HINT = "set allow_private = true to permit private/loopback addresses"

_V4_NEVER = [  # refused even with allow_private
    (ipaddress.ip_network("0.0.0.0/8"), "unspecified / 'this network' (0.0.0.0/8)"),
    (ipaddress.ip_network("224.0.0.0/4"), "multicast (224.0.0.0/4)"),
    (ipaddress.ip_network("255.255.255.255/32"), "limited broadcast (255.255.255.255)"),
]
_V4_PRIVATE = [  # refused unless allow_private
    (ipaddress.ip_network("127.0.0.0/8"), "loopback (127.0.0.0/8)"),
    (ipaddress.ip_network("10.0.0.0/8"), "private (10.0.0.0/8)"),
    (ipaddress.ip_network("172.16.0.0/12"), "private (172.16.0.0/12)"),
    (ipaddress.ip_network("192.168.0.0/16"), "private (192.168.0.0/16)"),
    (ipaddress.ip_network("169.254.0.0/16"), "link-local (169.254.0.0/16, includes cloud metadata 169.254.169.254)"),
    (ipaddress.ip_network("100.64.0.0/10"), "carrier-grade NAT (100.64.0.0/10)"),
    (ipaddress.ip_network("240.0.0.0/4"), "reserved (240.0.0.0/4)"),
]
_V6_NEVER = [
    (ipaddress.ip_network("::/128"), "unspecified (::)"),
    (ipaddress.ip_network("ff00::/8"), "multicast (ff00::/8)"),
]
_V6_PRIVATE = [
    (ipaddress.ip_network("::1/128"), "loopback (::1)"),
    (ipaddress.ip_network("fc00::/7"), "unique-local private (fc00::/7)"),
    (ipaddress.ip_network("fe80::/10"), "link-local (fe80::/10)"),
    (ipaddress.ip_network("fec0::/10"), "site-local (fec0::/10)"),
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

# Legacy numeric IPv4 spellings that inet_aton and getaddrinfo accept: 127.1, 0x7f000001, 2130706433, 0177.0.0.1
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?", re.IGNORECASE)
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
_BAD_CHARS = re.compile(r"[\s\x00-\x1f\x7f]")


class UrlRefused(ValueError):
    """A webhook URL or address is not an acceptable destination; the message says why."""


def _refuse_ip(what: str, allow_private: bool, shown: str) -> None:
    if allow_private:
        return
    raise UrlRefused(f"address {shown} is {what}; {_HINT}")


def _check_ip(ip: IPAddress, allow_private: bool, shown: str) -> None:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.scope_id is not None:
            ip = ipaddress.IPv6Address(ip.packed)
        for net, what in _V6_NEVER:
            if ip in net:
                raise UrlRefused(f"address {shown} is {what} and is never a valid webhook destination")
        mapped = ip.ipv4_mapped
        if mapped is not None:
            _check_ip(mapped, allow_private, f"{shown} (IPv4-mapped {mapped})")
            return
        if ip in _NAT64:
            embedded = ipaddress.IPv4Address(ip.packed[-4:])
            _check_ip(embedded, allow_private, f"{shown} (NAT64 for {embedded})")
            return
        if ip.sixtofour is not None:
            _check_ip(ip.sixtofour, allow_private, f"{shown} (6to4 for {ip.sixtofour})")
        for net, what in _V6_PRIVATE:
            if ip in net:
                _refuse_ip(what, allow_private, shown)
        if ip.is_reserved or not ip.is_global:
            _refuse_ip("reserved / not globally routable", allow_private, shown)
        return
    for net, what in _V4_NEVER:
        if ip in net:
            raise UrlRefused(f"address {shown} is {what} and is never a valid webhook destination")
    for net, what in _V4_PRIVATE:
        if ip in net:
            _refuse_ip(what, allow_private, shown)
    if ip.is_reserved or not ip.is_global:
        _refuse_ip("special-purpose / not globally routable", allow_private, shown)


def check_ip(ip: str | IPAddress, allow_private: bool) -> None:
    """Raise UrlRefused unless `ip` is an acceptable webhook destination address.

    Without `allow_private`, only globally routable unicast addresses pass. With it,
    everything passes except unspecified (0.0.0.0/8, ::), multicast and broadcast.
    IPv4-mapped (::ffff:a.b.c.d), NAT64 (64:ff9b::/96) and 6to4 forms are judged by the
    IPv4 address they embed.
    """
    if isinstance(ip, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        addr = ip
    else:
        try:
            addr = ipaddress.ip_address(str(ip).strip("[]"))
        except ValueError:
            raise UrlRefused(f"{ip!r} is not a valid IP address") from None
    _check_ip(addr, allow_private, str(addr))


def _shown(url: str) -> str:
    return url if len(url) <= 100 else url[:97] + "..."


def _split(url: str) -> tuple[str, str, int]:
    """Syntax-check `url` and return (scheme, host, port); host has no brackets."""
    if not isinstance(url, str):
        raise UrlRefused(f"webhook url must be a string, got {type(url).__name__}")
    shown = _shown(url)

    def refuse(why: str) -> UrlRefused:
        return UrlRefused(f"webhook url {shown!r}: {why}")

    if len(url) > MAX_URL_LENGTH:
        raise refuse(f"is {len(url)} characters long; at most {MAX_URL_LENGTH} are allowed")
    if _BAD_CHARS.search(url):
        raise refuse("contains whitespace or control characters")
    try:
        parts = urlsplit(url)
    except ValueError as e:
        raise refuse(f"cannot be parsed ({e})") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise refuse("scheme must be http or https")
    netloc = parts.netloc
    if not netloc:
        raise refuse("a host is required (http://host[:port]/path)")
    if "@" in netloc:
        raise refuse("credentials (user:password@) are not allowed in the url")
    if "\\" in netloc:
        raise refuse("backslash is not allowed in the host")
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise refuse("unterminated '[' in IPv6 host")
        host, rest = netloc[1:end], netloc[end + 1:]
        if rest and not rest.startswith(":"):
            raise refuse(f"unexpected {rest!r} after the IPv6 host")
        port_text = rest[1:] if rest else None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise refuse(f"[{host}] is not a valid IPv6 address") from None
    else:
        host, sep, port_text_ = netloc.rpartition(":")
        if sep:
            port_text = port_text_
        else:
            host, port_text = netloc, None
        if ":" in host:
            raise refuse("IPv6 addresses must be written in brackets, e.g. http://[2001:db8::1]/")
    if not host:
        raise refuse("a host is required (http://host[:port]/path)")
    if port_text is not None:
        if not port_text.isascii() or not port_text.isdigit():
            raise refuse(f"port {port_text!r} must be a number 1..65535")
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise refuse(f"port {port} is out of range 1..65535")
    else:
        port = 443 if scheme == "https" else 80
    if not netloc.startswith("[") and not _HOSTNAME.fullmatch(host):
        raise refuse(f"host {host!r} contains characters not allowed in a host name "
                     "(use letters, digits, '-', '.'; write international names in punycode)")
    return scheme, host, port


def _literal(host: str) -> IPAddress | None:
    """The address `host` denotes without DNS (incl. legacy numeric IPv4 forms), or None."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host.rstrip(".")))
        except OSError:
            raise UrlRefused(f"host {host!r} looks numeric but is not a valid IPv4 address") from None
    return None


def check_url(url: str, allow_private: bool = False) -> None:
    """Raise UrlRefused unless `url` is syntactically acceptable as a webhook URL (no DNS).

    Requires an http/https scheme and a host; refuses userinfo, bad ports, over-long URLs,
    whitespace/control characters; applies `check_ip` when the host is an IP literal
    (including legacy numeric spellings such as 127.1 or 2130706433).
    """
    _scheme, host, _port = _split(url)
    try:
        addr = _literal(host)
        if addr is not None:
            check_ip(addr, allow_private)
    except UrlRefused as e:
        raise UrlRefused(f"webhook url {_shown(url)!r}: {e}") from None


def resolve_and_check(url: str, allow_private: bool) -> list[str]:
    """Check `url`, resolve its host (blocking) and check every resolved address.

    Returns the distinct addresses in resolver order. Raises UrlRefused if the URL is
    refused, the host does not resolve, or any address is refused (DNS-rebinding guard).
    """
    check_url(url, allow_private)
    _scheme, host, port = _split(url)
    literal = _literal(host)
    lookup = str(literal) if literal is not None else host
    try:
        infos = socket.getaddrinfo(lookup, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as e:
        reason = getattr(e, "strerror", None) or str(e)
        raise UrlRefused(f"webhook url {_shown(url)!r}: cannot resolve host {host!r}: {reason}") from None
    addresses: list[str] = []
    for family, _type, _proto, _canon, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        addr = str(sockaddr[0])
        if addr not in addresses:
            addresses.append(addr)
    if not addresses:
        raise UrlRefused(f"webhook url {_shown(url)!r}: host {host!r} resolved to no IPv4/IPv6 address")
    for addr in addresses:
        try:
            check_ip(addr, allow_private)
        except UrlRefused as e:
            raise UrlRefused(f"webhook url {_shown(url)!r}: host {host!r} resolves to a refused address: {e}") from None
    return addresses
