"""Mail that comes back to letters, in the formats real servers send, written from their
documented formats: Postfix (RFC 3464 DSN), Exchange Online / Microsoft 365 NDRs, Gmail's DSN,
Exim's plain-text bounce and delay warning, Exchange's "Automatic reply:", an RFC 3834
auto-reply, and a person's reply (HTML and text, with an attachment).

Each takes the letter's Message-ID, the MP's address it was sent to, and the return address it
came back to.
"""

from __future__ import annotations


def _crlf(text: str) -> bytes:
    return text.replace("\r\n", "\n").replace("\n", "\r\n").encode()


def postfix_dsn(message_id: str, rcpt: str, return_path: str, status: str = "5.1.1") -> bytes:
    action = "failed" if status.startswith("5") else "delayed"
    return _crlf(f"""\
Return-Path: <>
Received: by relay.campaign.example.org (Postfix) id 4Xyz1; Wed,  2 Dec 2026 10:00:01 +0000 (UTC)
Date: Wed,  2 Dec 2026 10:00:01 +0000 (UTC)
From: MAILER-DAEMON@relay.campaign.example.org (Mail Delivery System)
Subject: Undelivered Mail Returned to Sender
To: {return_path}
Auto-Submitted: auto-replied
MIME-Version: 1.0
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="4Xyz1.1733133601/relay.campaign.example.org"
Content-Transfer-Encoding: 7bit
Message-Id: <20261202100001.4Xyz1@relay.campaign.example.org>

This is a MIME-encapsulated message.

--4Xyz1.1733133601/relay.campaign.example.org
Content-Description: Notification
Content-Type: text/plain; charset=us-ascii

This is the mail system at host relay.campaign.example.org.

I'm sorry to have to inform you that your message could not
be delivered to one or more recipients. It's attached below.

<{rcpt}>: host mx.parliament.example[192.0.2.10] said: 550 {status} <{rcpt}>:
    Recipient address rejected: User unknown (in reply to RCPT TO command)

--4Xyz1.1733133601/relay.campaign.example.org
Content-Description: Delivery report
Content-Type: message/delivery-status

Reporting-MTA: dns; relay.campaign.example.org
X-Postfix-Queue-ID: 4Xyz1
X-Postfix-Sender: rfc822; {return_path}
Arrival-Date: Wed,  2 Dec 2026 10:00:00 +0000 (UTC)

Final-Recipient: rfc822; {rcpt}
Original-Recipient: rfc822;{rcpt}
Action: {action}
Status: {status}
Remote-MTA: dns; mx.parliament.example
Diagnostic-Code: smtp; 550 {status} <{rcpt}>: Recipient address rejected: User
    unknown

--4Xyz1.1733133601/relay.campaign.example.org
Content-Description: Undelivered Message Headers
Content-Type: text/rfc822-headers

From: Sam Supporter via Campaign <letters@campaign.example.org>
To: The MP <{rcpt}>
Subject: Please act
Message-ID: {message_id}

--4Xyz1.1733133601/relay.campaign.example.org--
""")


def exchange_online_ndr(message_id: str, rcpt: str, return_path: str) -> bytes:
    return _crlf(f"""\
Received: from AM0PR01MB1234.eurprd01.prod.outlook.com by AM0PR01MB1234.eurprd01.prod.outlook.com
 with Microsoft SMTP Server id 15.20.1; Wed, 2 Dec 2026 10:00:05 +0000
From: postmaster@parliament.onmicrosoft.com
To: {return_path}
Date: Wed, 2 Dec 2026 10:00:05 +0000
Subject: Undeliverable: Please act
Content-Type: multipart/report; report-type=delivery-status;
\tboundary="_000_NDR_boundary_"
Content-Language: en-GB
Message-ID: <NDR-9f1c2b@AM0PR01MB1234.eurprd01.prod.outlook.com>
In-Reply-To: {message_id}
References: {message_id}
MIME-Version: 1.0
X-MS-Exchange-Message-Is-Ndr:
Auto-Submitted: auto-replied
X-MS-Exchange-Organization-SCL: -1

--_000_NDR_boundary_
Content-Type: text/html; charset="utf-8"
Content-Transfer-Encoding: quoted-printable

<html><body><p><b><font color=3D"#000066" size=3D"3" face=3D"Arial">Your me=
ssage to {rcpt} couldn't be delivered.</font></b></p>
<p>{rcpt.split("@")[0]} wasn't found at parliament.example.</p>
<p>Remote Server returned '550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipie=
nt not found by SMTP address lookup'</p></body></html>

--_000_NDR_boundary_
Content-Type: message/delivery-status

Reporting-MTA: dns;AM0PR01MB1234.eurprd01.prod.outlook.com
Received-From-MTA: dns;relay.campaign.example.org
Arrival-Date: Wed, 2 Dec 2026 10:00:04 +0000

Final-Recipient: rfc822;{rcpt}
Action: failed
Status: 5.1.10
Diagnostic-Code: smtp;550 5.1.10 RESOLVER.ADR.RecipientNotFound; Recipient not found by SMTP
 address lookup

--_000_NDR_boundary_
Content-Type: message/rfc822

From: Sam Supporter via Campaign <letters@campaign.example.org>
To: The MP <{rcpt}>
Subject: Please act
Date: Wed, 2 Dec 2026 09:59:58 +0000
Message-ID: {message_id}
MIME-Version: 1.0
Content-Type: text/plain; charset="utf-8"

Dear MP,

--_000_NDR_boundary_--
""")


def gmail_dsn(message_id: str, rcpt: str, return_path: str) -> bytes:
    return _crlf(f"""\
Received: by 2002:a05:6a10:1234 with SMTP id abc; Wed, 02 Dec 2026 02:00:06 -0800 (PST)
Return-Path: <>
From: Mail Delivery Subsystem <mailer-daemon@googlemail.com>
To: {return_path}
Auto-Submitted: auto-replied
Subject: Delivery Status Notification (Failure)
References: {message_id}
In-Reply-To: {message_id}
X-Failed-Recipients: {rcpt}
Message-ID: <6750a1b2.abc.def@mx.google.com>
Date: Wed, 02 Dec 2026 02:00:06 -0800 (PST)
MIME-Version: 1.0
Content-Type: multipart/report; boundary="000000000000gmailboundary"; report-type=delivery-status

--000000000000gmailboundary
Content-Type: text/plain; charset="UTF-8"

** Address not found **

Your message wasn't delivered to {rcpt} because the address couldn't be found, or is
unable to receive mail.

The response from the remote server was:
550 5.1.1 The email account that you tried to reach does not exist.

--000000000000gmailboundary
Content-Type: message/delivery-status

Reporting-MTA: dns; googlemail.com
Received-From-MTA: dns; relay.campaign.example.org
Arrival-Date: Wed, 02 Dec 2026 02:00:05 -0800 (PST)
X-Original-Message-ID: {message_id}

Final-Recipient: rfc822; {rcpt}
Action: failed
Status: 5.1.1
Remote-MTA: dns; gmail-smtp-in.l.google.com. (142.250.0.26, the server for the domain gmail.com.)
Diagnostic-Code: smtp; 550-5.1.1 The email account that you tried to reach does not exist.
Last-Attempt-Date: Wed, 02 Dec 2026 02:00:06 -0800 (PST)

--000000000000gmailboundary
Content-Type: text/rfc822-headers

From: Sam Supporter via Campaign <letters@campaign.example.org>
To: The MP <{rcpt}>
Subject: Please act
Message-ID: {message_id}

--000000000000gmailboundary--
""")


def exim_plain(message_id: str, rcpt: str, return_path: str) -> bytes:
    return _crlf(f"""\
Received: from Debian-exim by mail.parliament.example with local (Exim 4.96)
\tid 1tXyZ-000AbC-2x; Wed, 02 Dec 2026 10:00:07 +0000
X-Failed-Recipients: {rcpt}
Auto-Submitted: auto-replied
From: Mail Delivery System <Mailer-Daemon@mail.parliament.example>
To: {return_path}
Subject: Mail delivery failed: returning message to sender
Message-Id: <E1tXyZ-000AbC-2x@mail.parliament.example>
Date: Wed, 02 Dec 2026 10:00:07 +0000

This message was created automatically by mail delivery software.

A message that you sent could not be delivered to one or more of its
recipients. This is a permanent error. The following address(es) failed:

  {rcpt}
    SMTP error from remote mail server after RCPT TO:<{rcpt}>:
    host mx.parliament.example [192.0.2.10]: 550 5.1.1 <{rcpt}>: mailbox unavailable

------ This is a copy of the message, including all the headers. ------

Return-path: <{return_path}>
From: Sam Supporter via Campaign <letters@campaign.example.org>
To: The MP <{rcpt}>
Subject: Please act
Message-ID: {message_id}

Dear MP,
""")


def exim_delay(message_id: str, rcpt: str, return_path: str) -> bytes:
    return _crlf(f"""\
X-Failed-Recipients: {rcpt}
Auto-Submitted: auto-replied
From: Mail Delivery System <Mailer-Daemon@mail.parliament.example>
To: {return_path}
Subject: Warning: message 1tXyZ-000AbC-2x delayed 24 hours
Message-Id: <E1tXyZ-000AbC-3y@mail.parliament.example>
Date: Thu, 03 Dec 2026 10:00:07 +0000

This message was created automatically by mail delivery software.
A message that you sent has not yet been delivered to one or more of its
recipients after more than 24 hours on the queue on mail.parliament.example.

The message identifier is:     1tXyZ-000AbC-2x
The subject of the message is: Please act

The address to which the message has not yet been delivered is:

  {rcpt}
    host mx.parliament.example [192.0.2.10]: 451 4.3.0 Temporary local problem

No action is required on your part. Delivery attempts will continue for
some time, and this warning may be repeated at intervals if the message
remains undelivered. Eventually the mail delivery software will give up,
and when that happens, the message will be returned to you.
""")


def exchange_automatic_reply(message_id: str, mp: str, to: str) -> bytes:
    return _crlf(f"""\
From: "SMITH, Jane" <{mp}>
To: {to}
Subject: Automatic reply: Please act
Thread-Topic: Please act
Date: Wed, 2 Dec 2026 10:01:00 +0000
Message-ID: <oof-1234@AM0PR01MB1234.eurprd01.prod.outlook.com>
In-Reply-To: {message_id}
References: {message_id}
Auto-Submitted: auto-generated
X-Auto-Response-Suppress: All
X-MS-Exchange-Inbox-Rules-Loop: {mp}
Content-Type: text/plain; charset="us-ascii"
MIME-Version: 1.0

Thank you for your email. Jane Smith MP receives a large volume of correspondence and will
reply to constituents as soon as possible.
""")


def rfc3834_auto_reply(message_id: str, mp: str, to: str) -> bytes:
    return _crlf(f"""\
From: Office of Jane Smith MP <{mp}>
To: {to}
Subject: Re: Please act
Date: Wed, 2 Dec 2026 10:01:00 +0000
Message-ID: <ack-5678@parliament.example>
In-Reply-To: {message_id}
Auto-Submitted: auto-replied
Precedence: auto_reply
Content-Type: text/plain; charset="utf-8"

We have received your email and will respond to constituents within 15 working days.
""")


def human_reply(message_id: str, mp: str, to: str, words: str = "Thank you for writing") -> bytes:
    return _crlf(f"""\
From: "Jane Smith MP" <{mp}>
To: {to}
Subject: RE: Please act
Date: Thu, 10 Dec 2026 15:30:00 +0000
Message-ID: <reply-{abs(hash(words))}@parliament.example>
In-Reply-To: {message_id}
References: {message_id}
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary="outer"

--outer
Content-Type: multipart/alternative; boundary="inner"

--inner
Content-Type: text/plain; charset="utf-8"
Content-Transfer-Encoding: quoted-printable

Dear Sam,

{words} =E2=80=94 I have raised this with the minister.

Jane Smith MP

--inner
Content-Type: text/html; charset="utf-8"

<p>Dear Sam,</p><p>{words} &mdash; I have raised this with the minister.</p>
--inner--

--outer
Content-Type: application/pdf; name="letter.pdf"
Content-Disposition: attachment; filename="letter.pdf"
Content-Transfer-Encoding: base64

JVBERi0xLjQKJcfsj6IKNSAwIG9iago8PC9MZW5ndGggNiAwIFI+PgpzdHJlYW0K
--outer--
""")
